//! What a handler uses to talk back: replies, actions, queries, logs, subscriptions.

use std::collections::{HashMap, VecDeque};

use prost::Message;

use crate::codec::BufferPool;
use crate::proto::{
    self, Action, ActionResult, EventResult, EventSubscribe, EventType, GameMode, ItemStack, LogMessage, PluginToHost,
    action, event_result, plugin_to_host,
};

/// A handler's answer to an event.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Reply {
    /// No change (sent as an empty `EventResult` when the event expects a response).
    #[default]
    Ack,
    /// Cancel the event.
    Cancel,
    /// Change the event.
    Mutate(event_result::Update),
}

impl Reply {
    /// Replace a chat message.
    pub fn chat_message(message: impl Into<String>) -> Self {
        Reply::Mutate(event_result::Update::Chat(proto::ChatMutation {
            message: Some(message.into()),
        }))
    }
}

/// Called with the `ActionResult` of a query.
pub type QueryCallback = Box<dyn FnOnce(&mut Context<'_>, &ActionResult) + Send>;

/// Most encoded messages a plugin may hold while the host is not reading its replies.
pub(crate) const OUTBOX_LIMIT: usize = 65_536;

/// Encoded messages waiting for room on the link, in order.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub frames: VecDeque<Vec<u8>>,
    pub pool: BufferPool,
    actions: Vec<Action>,
    /// Sent actions kept for reuse by kind (field number), cleared with their variant and
    /// strings kept: the `Context` helpers fill them in place.
    spare_actions: Vec<(i32, Vec<Action>)>,
    spare_count: usize,
    /// Reused messages: an answer, an action batch, a log line.
    msg: PluginToHost,
    batch_msg: PluginToHost,
    log_msg: PluginToHost,
    pub plugin_id: String,
    pub replies: u64,
    /// The text of the last chat mutation sent, lent again by [`Context::recycled_string`].
    spare_text: String,
}

/// Most sent actions kept for reuse, over all kinds.
const MAX_SPARE_ACTIONS: usize = 1024;
/// Most action kinds kept for reuse.
const MAX_SPARE_KINDS: usize = 32;
/// A sent action this large (encoded) is not kept for reuse.
const MAX_SPARE_ACTION_BYTES: usize = 4096;

impl Outbox {
    pub fn new(plugin_id: &str) -> Self {
        Self {
            plugin_id: plugin_id.to_owned(),
            msg: PluginToHost {
                plugin_id: plugin_id.to_owned(),
                payload: Some(plugin_to_host::Payload::EventResult(EventResult::default())),
            },
            batch_msg: PluginToHost {
                plugin_id: plugin_id.to_owned(),
                payload: Some(plugin_to_host::Payload::Actions(proto::ActionBatch::default())),
            },
            log_msg: PluginToHost {
                plugin_id: plugin_id.to_owned(),
                payload: Some(plugin_to_host::Payload::Log(LogMessage::default())),
            },
            ..Default::default()
        }
    }

    /// Queues a log line; reuses one message (no allocation in steady state).
    pub fn log(&mut self, level: &str, message: &str) {
        self.flush_actions();
        let mut msg = std::mem::take(&mut self.log_msg);
        match &mut msg.payload {
            Some(plugin_to_host::Payload::Log(l)) => {
                l.level.clear();
                l.level.push_str(level);
                l.message.clear();
                l.message.push_str(message);
            }
            _ => {
                msg.plugin_id.clone_from(&self.plugin_id);
                msg.payload = Some(plugin_to_host::Payload::Log(LogMessage {
                    level: level.to_owned(),
                    message: message.to_owned(),
                }));
            }
        }
        self.encode(&msg);
        if let Some(plugin_to_host::Payload::Log(l)) = &mut msg.payload {
            if l.message.capacity() > MAX_SPARE_ACTION_BYTES {
                l.message = String::new();
            }
        }
        self.log_msg = msg;
    }

    /// An action of `template`'s kind to fill: a sent one kept for reuse (cleared, its
    /// strings' capacity kept) if any, else `template` itself.
    pub fn spare_action(&mut self, template: action::Kind) -> Action {
        let number = template.field_number();
        if let Some((_, list)) = self.spare_actions.iter_mut().find(|(n, _)| *n == number) {
            if let Some(a) = list.pop() {
                self.spare_count -= 1;
                return a;
            }
        }
        Action {
            correlation_id: None,
            kind: Some(template),
        }
    }

    /// Keeps a sent action for reuse (bounded).
    fn keep_action(&mut self, mut a: Action) {
        let Some(number) = a.kind.as_ref().map(action::Kind::field_number) else {
            return;
        };
        if self.spare_count >= MAX_SPARE_ACTIONS || a.encoded_len() > MAX_SPARE_ACTION_BYTES {
            return;
        }
        let k = match self.spare_actions.iter().position(|(n, _)| *n == number) {
            Some(k) => k,
            None if self.spare_actions.len() < MAX_SPARE_KINDS => {
                self.spare_actions.push((number, Vec::new()));
                self.spare_actions.len() - 1
            }
            None => return,
        };
        crate::codec::Reusable::reset_keep(&mut a);
        self.spare_actions[k].1.push(a);
        self.spare_count += 1;
    }

    fn encode(&mut self, msg: &PluginToHost) {
        let mut buf = self.pool.take();
        msg.encode_raw(&mut buf);
        self.frames.push_back(buf);
    }

    /// Queues one message (after any actions gathered before it, to keep order).
    pub fn push(&mut self, payload: plugin_to_host::Payload) {
        self.flush_actions();
        let msg = PluginToHost {
            plugin_id: self.plugin_id.clone(),
            payload: Some(payload),
        };
        self.encode(&msg);
    }

    /// Queues the answer to event `event_id`. Reuses one message: no allocation for `Ack` and
    /// `Cancel` in steady state.
    pub fn result(&mut self, event_id: &str, reply: Reply) {
        self.flush_actions();
        let mut msg = std::mem::take(&mut self.msg);
        if !matches!(msg.payload, Some(plugin_to_host::Payload::EventResult(_))) {
            msg.payload = Some(plugin_to_host::Payload::EventResult(EventResult::default()));
        }
        if let Some(plugin_to_host::Payload::EventResult(r)) = &mut msg.payload {
            r.event_id.clear();
            r.event_id.push_str(event_id);
            r.cancel = matches!(reply, Reply::Cancel).then_some(true);
            r.update = match reply {
                Reply::Mutate(u) => Some(u),
                _ => None,
            };
        }
        self.encode(&msg);
        if let Some(plugin_to_host::Payload::EventResult(r)) = &mut msg.payload {
            if let Some(event_result::Update::Chat(proto::ChatMutation { message: Some(text) })) = r.update.take() {
                self.spare_text = text;
            }
        }
        self.msg = msg;
        self.replies += 1;
    }

    /// Gathers an action; actions go out together as one `ActionBatch`.
    pub fn action(&mut self, a: Action) {
        self.actions.push(a);
    }

    /// Turns the gathered actions into one `ActionBatch` message (reused), and keeps the sent
    /// actions for reuse.
    pub fn flush_actions(&mut self) {
        if self.actions.is_empty() {
            return;
        }
        let mut msg = std::mem::take(&mut self.batch_msg);
        if !matches!(msg.payload, Some(plugin_to_host::Payload::Actions(_))) {
            msg.plugin_id.clone_from(&self.plugin_id);
            msg.payload = Some(plugin_to_host::Payload::Actions(proto::ActionBatch::default()));
        }
        if let Some(plugin_to_host::Payload::Actions(b)) = &mut msg.payload {
            std::mem::swap(&mut b.actions, &mut self.actions);
        }
        self.encode(&msg);
        if let Some(plugin_to_host::Payload::Actions(b)) = &mut msg.payload {
            std::mem::swap(&mut b.actions, &mut self.actions);
        }
        self.batch_msg = msg;
        let mut sent = std::mem::take(&mut self.actions);
        for a in sent.drain(..) {
            self.keep_action(a);
        }
        self.actions = sent;
    }
}

/// The handler's view of its plugin: send actions and queries, log, change subscriptions.
pub struct Context<'a> {
    pub(crate) out: &'a mut Outbox,
    pub(crate) queries: &'a mut HashMap<String, QueryCallback>,
    pub(crate) next_query: &'a mut u64,
}

impl Context<'_> {
    /// This plugin's id.
    pub fn plugin_id(&self) -> &str {
        &self.out.plugin_id
    }

    /// An empty string holding the storage of the last chat mutation this plugin sent: write
    /// the new text into it and answer with [`Reply::chat_message`], and a chat filter answers
    /// without allocating in steady state.
    pub fn recycled_string(&mut self) -> String {
        let mut s = std::mem::take(&mut self.out.spare_text);
        s.clear();
        s
    }

    /// Sends any action (actions of one handler call travel as one batch, in order).
    pub fn send_action(&mut self, kind: action::Kind) {
        self.out.action(Action {
            correlation_id: None,
            kind: Some(kind),
        });
    }

    /// Sends an action whose `ActionResult` comes back to `callback`; returns its correlation
    /// id. Results without a callback go to `Handler::on_action_result`.
    pub fn query(
        &mut self,
        kind: action::Kind,
        callback: impl FnOnce(&mut Context<'_>, &ActionResult) + Send + 'static,
    ) -> String {
        *self.next_query += 1;
        let id = format!("{}-q{}", self.out.plugin_id, self.next_query);
        self.queries.insert(id.clone(), Box::new(callback));
        self.out.action(Action {
            correlation_id: Some(id.clone()),
            kind: Some(kind),
        });
        id
    }

    /// Sends an action of `template`'s kind, filled in place by `fill` (in a sent action kept
    /// for reuse when there is one, so that steady state allocates nothing).
    fn send_filled(&mut self, template: action::Kind, fill: impl FnOnce(&mut action::Kind)) {
        let mut a = self.out.spare_action(template);
        if let Some(k) = a.kind.as_mut() {
            fill(k);
        }
        self.out.action(a);
    }

    /// Sends a chat message to one player (`target_uuid`), or to everyone if it is empty.
    pub fn send_chat(&mut self, target_uuid: &str, message: &str) {
        let template = action::Kind::SendChat(proto::SendChatAction::default());
        self.send_filled(template, |k| {
            if let action::Kind::SendChat(a) = k {
                a.target_uuid.push_str(target_uuid);
                a.message.push_str(message);
            }
        });
    }

    /// Teleports a player to `position`, facing `yaw` and `pitch` (degrees; sent as the
    /// protocol's rotation `Vec3 { x: yaw, y: pitch, z: 0 }`, Dragonfly's yaw-then-pitch order).
    pub fn teleport(&mut self, player_uuid: &str, position: [f64; 3], yaw: f64, pitch: f64) {
        let template = action::Kind::Teleport(proto::TeleportAction::default());
        self.send_filled(template, |k| {
            if let action::Kind::Teleport(a) = k {
                a.player_uuid.push_str(player_uuid);
                a.position = Some(proto::Vec3 {
                    x: position[0],
                    y: position[1],
                    z: position[2],
                });
                a.rotation = Some(proto::Vec3 {
                    x: yaw,
                    y: pitch,
                    z: 0.0,
                });
            }
        });
    }

    /// Kicks a player.
    pub fn kick(&mut self, player_uuid: &str, reason: &str) {
        let template = action::Kind::Kick(proto::KickAction::default());
        self.send_filled(template, |k| {
            if let action::Kind::Kick(a) = k {
                a.player_uuid.push_str(player_uuid);
                a.reason.push_str(reason);
            }
        });
    }

    /// Sets a player's game mode.
    pub fn set_game_mode(&mut self, player_uuid: &str, mode: GameMode) {
        let template = action::Kind::SetGameMode(proto::SetGameModeAction::default());
        self.send_filled(template, |k| {
            if let action::Kind::SetGameMode(a) = k {
                a.player_uuid.push_str(player_uuid);
                a.game_mode = mode as i32;
            }
        });
    }

    /// Gives a player an item.
    pub fn give_item(&mut self, player_uuid: &str, name: &str, count: i32) {
        self.send_action(action::Kind::GiveItem(proto::GiveItemAction {
            player_uuid: player_uuid.to_owned(),
            item: Some(ItemStack {
                name: name.to_owned(),
                meta: 0,
                count,
            }),
        }));
    }

    /// Shows a title to a player.
    pub fn send_title(&mut self, player_uuid: &str, title: &str, subtitle: Option<&str>) {
        self.send_action(action::Kind::SendTitle(proto::SendTitleAction {
            player_uuid: player_uuid.to_owned(),
            title: title.to_owned(),
            subtitle: subtitle.map(str::to_owned),
            ..Default::default()
        }));
    }

    /// Sets a player's health.
    pub fn set_health(&mut self, player_uuid: &str, health: f64) {
        let template = action::Kind::SetHealth(proto::SetHealthAction::default());
        self.send_filled(template, |k| {
            if let action::Kind::SetHealth(a) = k {
                a.player_uuid.push_str(player_uuid);
                a.health = health;
                a.max_health = None;
            }
        });
    }

    /// Runs a command as a player.
    pub fn execute_command(&mut self, player_uuid: &str, command: &str) {
        let template = action::Kind::ExecuteCommand(proto::ExecuteCommandAction::default());
        self.send_filled(template, |k| {
            if let action::Kind::ExecuteCommand(a) = k {
                a.player_uuid.push_str(player_uuid);
                a.command.push_str(command);
            }
        });
    }

    /// Writes a line into the host's log (`level`: error, warn, info, debug, trace).
    pub fn log(&mut self, level: &str, message: &str) {
        self.out.log(level, message);
    }

    /// Replaces the subscription set (`EventType::All` means every event).
    pub fn subscribe(&mut self, events: &[EventType]) {
        self.out.push(plugin_to_host::Payload::Subscribe(EventSubscribe {
            events: events.iter().map(|e| *e as i32).collect(),
        }));
    }
}
