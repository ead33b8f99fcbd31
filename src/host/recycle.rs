//! Recycled items for the server: the actions and log lines a plugin sends are decoded into
//! items taken from here, and the server may give them back ([`Host::recycle_action`],
//! [`Host::recycle_log`]) so that their strings serve the next ones. Bounded: beyond the caps,
//! given-back items are dropped.
//!
//! [`Host::recycle_action`]: super::Host::recycle_action
//! [`Host::recycle_log`]: super::Host::recycle_log

use super::{ActionItem, LogItem};
use crate::codec::Reusable as _;

/// Most idle action items kept, over all kinds (with [`MAX_ITEM_BYTES`], about 4 MiB at most).
const MAX_ACTIONS: usize = 1024;
/// Most action kinds with a list of their own (a plugin may invent numbers).
const MAX_KINDS: usize = 64;
/// Most idle log items kept.
const MAX_LOGS: usize = 1024;
/// An item given back holding more than this many bytes (an action's encoding, a log line's
/// capacity) is dropped rather than kept. An action's strings only grow by decoding a larger
/// action into them, which then exceeds this when given back: kept items stay about this size.
const MAX_ITEM_BYTES: usize = 4 << 10;

/// Idle action items by kind (so that a taken item holds the variant it will be decoded into,
/// with its strings' capacity), and idle log items.
#[derive(Debug, Default)]
pub(super) struct Recycler {
    actions: Vec<(u32, Vec<ActionItem>)>,
    idle_actions: usize,
    logs: Vec<LogItem>,
}

impl Recycler {
    /// An item whose action was last of kind `kind` (field number) if one is idle.
    pub fn take_action(&mut self, kind: u32) -> Option<ActionItem> {
        let list = self.actions.iter_mut().find(|(k, _)| *k == kind)?;
        let item = list.1.pop()?;
        self.idle_actions -= 1;
        Some(item)
    }

    /// Keeps `item` for a later action of its kind (cleared, variant kept).
    pub fn give_action(&mut self, mut item: ActionItem) {
        let kind = item.action.oneof_number().unwrap_or(0) as u32;
        if self.idle_actions >= MAX_ACTIONS || prost::Message::encoded_len(&item.action) > MAX_ITEM_BYTES {
            return;
        }
        let k = match self.actions.iter().position(|(k, _)| *k == kind) {
            Some(k) => k,
            None if self.actions.len() < MAX_KINDS => {
                self.actions.push((kind, Vec::new()));
                self.actions.len() - 1
            }
            None => return,
        };
        item.action.reset_keep();
        item.plugin.clear();
        self.actions[k].1.push(item);
        self.idle_actions += 1;
    }

    /// An idle log item, if any.
    pub fn take_log(&mut self) -> Option<LogItem> {
        self.logs.pop()
    }

    /// Keeps `item` for a later log line.
    pub fn give_log(&mut self, mut item: LogItem) {
        if self.logs.len() >= MAX_LOGS || item.message.capacity() + item.level.capacity() > MAX_ITEM_BYTES {
            return;
        }
        item.plugin.clear();
        item.level.clear();
        item.message.clear();
        self.logs.push(item);
    }
}
