//! What comes in: the supervisor's reports, each plugin's messages (hello, subscriptions,
//! results, actions, logs), and the periodic health check. Non-blocking.

use std::time::{Duration, Instant};

use prost::encoding::{WireType, encode_key, encode_varint};

use super::slot::{EventSet, SendOutcome, SlotState};
use super::tick::overflow_reason;
use super::{ActionItem, Host, Notice, logsink};
use crate::codec::{self, PluginDecoder};
use crate::proto::{
    self, ActionResult, HostHello, HostShutdown, HostToPlugin, ServerInformationResponse, host_to_plugin,
    plugin_to_host,
};

/// `HostToPlugin.plugin_id` field number.
const HOST_TO_PLUGIN_PLUGIN_ID: u32 = 1;
/// `HostToPlugin.action_result` field number.
const HOST_TO_PLUGIN_ACTION_RESULT: u32 = 21;

/// A decoded action list longer than this is not kept for reuse.
const SHRINK_ABOVE: usize = 4096;
/// How often health is checked.
const HEALTH_EVERY: Duration = Duration::from_millis(50);

pub(super) fn shutdown_message(id: &str, reason: &str) -> HostToPlugin {
    HostToPlugin {
        plugin_id: id.to_owned(),
        payload: Some(host_to_plugin::Payload::Shutdown(HostShutdown {
            reason: reason.to_owned(),
        })),
    }
}

impl Host {
    /// Takes the supervisor's reports (links made, processes exited), reads every plugin's
    /// messages and handles them, and checks health. Non-blocking; `end_tick` calls it.
    pub fn poll(&mut self) {
        self.take_reports();
        for i in 0..self.slots.len() {
            self.read_replies(i);
        }
        let now = Instant::now();
        if now.duration_since(self.last_health) >= HEALTH_EVERY {
            self.last_health = now;
            for i in 0..self.slots.len() {
                self.check_health(i, now);
            }
        }
    }

    /// Takes in plugin `i`'s messages, within this poll's budgets (frames, bytes, actions,
    /// log lines): what is left waits in the plugin's link, which holds the plugin back.
    fn read_replies(&mut self, i: usize) {
        let h = &self.settings;
        let (max_frames, max_bytes, max_actions, max_logs) =
            (h.poll_max_frames, h.poll_max_bytes, h.poll_max_actions, h.poll_max_logs);
        self.poll_actions = 0;
        self.poll_logs = 0;
        let mut frames = 0;
        let mut bytes = 0;
        while frames < max_frames && bytes < max_bytes && self.poll_actions < max_actions && self.poll_logs < max_logs {
            if !self.slots[i].is_live() {
                return;
            }
            let Some(link) = self.slots[i].link.as_mut() else {
                return;
            };
            let mut buf = std::mem::take(&mut self.rx_buf);
            buf.clear();
            // One message at a time, copied out: the adapter lends bytes only for the call.
            let r = link.recv(1, &mut |b| buf.extend_from_slice(b));
            match r {
                Ok(0) => {
                    self.rx_buf = buf;
                    return;
                }
                Ok(_) => {
                    frames += 1;
                    bytes += buf.len();
                    self.on_message(i, &buf);
                    self.rx_buf = buf;
                }
                Err(e) => {
                    self.rx_buf = buf;
                    self.disconnect(i, format!("link error: {e}"), true, Instant::now());
                    return;
                }
            }
        }
    }

    /// Disconnects plugin `i` for making the host hold more than the settings allow.
    fn over_quota(&mut self, i: usize, what: String) {
        let reason = format!("quota exceeded: {what}");
        tracing::error!(plugin = %self.slots[i].cfg.id, "{reason}");
        self.disconnect(i, reason, true, Instant::now());
    }

    fn on_message(&mut self, i: usize, bytes: &[u8]) {
        // Actions are decoded one by one into recycled items, never as a whole batch.
        if let Ok(Some(codec::PLUGIN_TO_HOST_ACTIONS)) = codec::peek_plugin_to_host(bytes) {
            self.on_actions(i, bytes);
            return;
        }
        // Lent out of `self` while the message is handled, so that its parts are read in place.
        let mut decoder = std::mem::take(&mut self.decoder);
        self.on_decoded(i, &mut decoder, bytes);
        self.decoder = decoder;
    }

    /// Takes in an `ActionBatch`: each action decoded into an item from the recycler, the whole
    /// batch refused (and the plugin disconnected) if it would pass the plugin's quota.
    fn on_actions(&mut self, i: usize, bytes: &[u8]) {
        let mut staged = std::mem::take(&mut self.staged_actions);
        let mut bytes_held = 0;
        let id = &self.slots[i].cfg.id;
        let recycler = &mut self.recycler;
        let r = codec::for_each_action(bytes, |body| {
            let kind = codec::peek_action_kind(body)?.unwrap_or(0);
            let mut item = recycler.take_action(kind).unwrap_or_else(|| ActionItem {
                plugin: String::new(),
                action: proto::Action::default(),
            });
            if let Err(e) = codec::decode_reuse(&mut item.action, body) {
                recycler.give_action(item);
                return Err(e);
            }
            item.plugin.push_str(id);
            bytes_held += prost::Message::encoded_len(&item.action);
            staged.push(item);
            Ok(())
        });
        let n = staged.len();
        let refusal = match r {
            Err(e) => Some(Err(format!("malformed PluginToHost message: {e}"))),
            Ok(_) => {
                let (limit, limit_bytes) = (self.settings.max_queued_actions, self.settings.max_queued_bytes);
                let held = self.slots[i].held;
                (held.actions + n > limit || held.bytes() + bytes_held > limit_bytes).then(|| {
                    Ok(format!(
                        "{} actions ({} bytes with its log lines) wait for the server to take them and {n} more came \
                         (host.max_queued_actions = {limit}, host.max_queued_bytes = {limit_bytes})",
                        held.actions,
                        held.bytes()
                    ))
                })
            }
        };
        if refusal.is_some() {
            for item in staged.drain(..) {
                self.recycler.give_action(item);
            }
        } else {
            self.poll_actions += n;
            let s = &mut self.slots[i];
            s.held.actions += n;
            s.held.action_bytes += bytes_held;
            self.stats.actions += n as u64;
            self.actions.extend(staged.drain(..));
        }
        if staged.capacity() > SHRINK_ABOVE {
            // A huge batch must not keep its memory here.
            staged = Vec::new();
        }
        self.staged_actions = staged;
        match refusal {
            Some(Ok(what)) => self.over_quota(i, what),
            Some(Err(reason)) => self.disconnect(i, reason, true, Instant::now()),
            None => {}
        }
    }

    fn on_decoded(&mut self, i: usize, decoder: &mut PluginDecoder, bytes: &[u8]) {
        let msg = match decoder.decode_mut(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.disconnect(i, format!("malformed PluginToHost message: {e}"), true, Instant::now());
                return;
            }
        };
        let Some(payload) = msg.payload.as_mut() else {
            return;
        };
        match payload {
            plugin_to_host::Payload::Hello(hello) => {
                let hello = std::mem::take(hello);
                let plugin_id = msg.plugin_id.clone();
                self.on_hello(i, &plugin_id, hello);
            }
            plugin_to_host::Payload::Subscribe(sub) => {
                let set = EventSet::from_types(sub.events.iter().copied());
                let s = &mut self.slots[i];
                s.subscribed = set;
                tracing::debug!(plugin = %s.cfg.id, "subscriptions: {:?}", sub.events);
                self.rebuild_subs();
            }
            plugin_to_host::Payload::EventResult(r) => self.on_result(i, r),
            plugin_to_host::Payload::Actions(_) => {
                // Read by `on_actions` (the peek saw them); a decoder disagreeing is a bug.
                debug_assert!(false, "an ActionBatch reached the decoder");
            }
            plugin_to_host::Payload::Log(log) => {
                self.poll_logs += 1;
                let bytes = log.level.len() + log.message.len();
                let (limit, limit_bytes) = (self.settings.max_queued_logs, self.settings.max_queued_bytes);
                let held = self.slots[i].held;
                if held.logs + 1 > limit || held.bytes() + bytes > limit_bytes {
                    let what = format!(
                        "{} log lines ({} bytes with its actions) wait for the server to take them and one more came \
                         (host.max_queued_logs = {limit}, host.max_queued_bytes = {limit_bytes})",
                        held.logs,
                        held.bytes()
                    );
                    self.over_quota(i, what);
                    return;
                }
                let s = &mut self.slots[i];
                s.held.logs += 1;
                s.held.log_bytes += bytes;
                // Formatted (and escaped) on the log thread, not here; the text travels there
                // in a recycled buffer.
                self.log_sink
                    .send(&s.log_id, logsink::Level::parse(&log.level), &log.message);
                let mut item = self.recycler.take_log().unwrap_or_default();
                item.plugin.push_str(&s.cfg.id);
                item.level.push_str(&log.level);
                item.message.push_str(&log.message);
                self.logs.push_back(item);
            }
            plugin_to_host::Payload::ServerInfo(_) => {
                let plugins = self.slots.iter().map(|s| s.cfg.id.clone()).collect();
                let reply = HostToPlugin {
                    plugin_id: self.slots[i].cfg.id.clone(),
                    payload: Some(host_to_plugin::Payload::ServerInfo(ServerInformationResponse {
                        plugins,
                    })),
                };
                self.send_control(i, &reply);
            }
        }
    }

    fn on_hello(&mut self, i: usize, plugin_id: &str, hello: proto::PluginHello) {
        let s = &self.slots[i];
        if s.state != SlotState::Connecting {
            tracing::warn!(plugin = %s.cfg.id, "second hello ignored");
            return;
        }
        let refusal = if hello.api_version != proto::API_VERSION {
            Some(format!(
                "unsupported api_version {:?}: this host speaks {:?}",
                hello.api_version,
                proto::API_VERSION
            ))
        } else if !plugin_id.is_empty() && plugin_id != s.cfg.id {
            Some(format!(
                "plugin id {plugin_id:?} does not match the configured id {:?}",
                s.cfg.id
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::error!(plugin = %s.cfg.id, "handshake refused: {reason}");
            let reason = format!("handshake refused: {reason}");
            let msg = shutdown_message(&s.cfg.id, &reason);
            self.send_control(i, &msg);
            // Not killed at once: the process reads why and exits by itself (within the grace).
            self.refuse(i, reason);
            return;
        }
        let reply = HostToPlugin {
            plugin_id: s.cfg.id.clone(),
            payload: Some(host_to_plugin::Payload::Hello(HostHello {
                api_version: proto::API_VERSION.to_owned(),
                boot_id: self.boot_id.to_string(),
            })),
        };
        // Subscriptions that came with the hello (a plugbus capability) hold from the moment
        // the plugin is ready.
        if let Some(caps) = hello.capabilities.as_ref().filter(|c| !c.subscribe.is_empty()) {
            self.slots[i].subscribed = EventSet::from_types(caps.subscribe.iter().copied());
        }
        let s = &self.slots[i];
        let name = format!("{} {}", hello.name, hello.version);
        tracing::info!(plugin = %s.cfg.id, "plugin ready: {name} ({} commands)", hello.commands.len());
        self.slots[i].hello = Some(hello);
        self.slots[i].state = SlotState::Ready;
        self.send_control(i, &reply);
        self.rebuild_subs();
        self.notices.push_back(Notice::Ready {
            id: self.slots[i].cfg.id.clone(),
            name,
        });
    }

    /// Sends the result of an action back to the plugin that asked (by its `correlation_id`).
    pub fn send_action_result(&mut self, plugin: &str, result: ActionResult) -> bool {
        self.send_action_result_ref(plugin, &result)
    }

    /// [`Host::send_action_result`] from a borrowed result (which the caller may reuse):
    /// encoded into a pooled buffer, so that it allocates nothing in steady state. Returns
    /// whether plugin `plugin` is ready (else nothing is sent).
    pub fn send_action_result_ref(&mut self, plugin: &str, result: &ActionResult) -> bool {
        let Some(i) = self.slots.iter().position(|s| s.cfg.id == plugin && s.is_ready()) else {
            return false;
        };
        // `HostToPlugin { plugin_id, action_result }`, as prost would encode it.
        let mut buf = self.pool.take();
        if !plugin.is_empty() {
            encode_key(HOST_TO_PLUGIN_PLUGIN_ID, WireType::LengthDelimited, &mut buf);
            encode_varint(plugin.len() as u64, &mut buf);
            buf.extend_from_slice(plugin.as_bytes());
        }
        prost::encoding::message::encode(HOST_TO_PLUGIN_ACTION_RESULT, result, &mut buf);
        let limit = self.settings.overflow_frames;
        let r = self.slots[i].send_encoded(buf, &mut self.pool, limit);
        self.after_send(i, r);
        true
    }

    pub(super) fn send_control(&mut self, i: usize, msg: &HostToPlugin) {
        let limit = self.settings.overflow_frames;
        let r = self.slots[i].send_message(msg, &mut self.pool, limit);
        self.after_send(i, r);
    }

    /// After a control message to plugin `i`: wakes it, or disconnects it on overflow or a
    /// link error.
    fn after_send(&mut self, i: usize, r: Result<SendOutcome, crate::transport::LinkError>) {
        let limit = self.settings.overflow_frames;
        let s = &mut self.slots[i];
        match r {
            Ok(SendOutcome::Sent | SendOutcome::Queued) => {
                super::tick::wake_slot(s, i, self.waker.as_ref(), &mut self.cost);
            }
            Ok(SendOutcome::Overflow) => {
                let reason = overflow_reason(s, limit);
                self.disconnect(i, reason, true, Instant::now());
            }
            Err(e) => self.disconnect(i, format!("link error: {e}"), true, Instant::now()),
        }
    }

    pub(super) fn rebuild_subs(&mut self) {
        for (t, list) in self.subs.iter_mut().enumerate() {
            list.clear();
            list.extend(
                self.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_ready() && s.subscribed.contains(t as i32))
                    .map(|(i, _)| i),
            );
        }
    }
}
