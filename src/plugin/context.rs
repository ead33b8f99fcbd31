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
    msg: PluginToHost,
    pub plugin_id: String,
    pub replies: u64,
}

impl Outbox {
    pub fn new(plugin_id: &str) -> Self {
        Self {
            plugin_id: plugin_id.to_owned(),
            msg: PluginToHost {
                plugin_id: plugin_id.to_owned(),
                payload: Some(plugin_to_host::Payload::EventResult(EventResult::default())),
            },
            ..Default::default()
        }
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
            r.update = None;
        }
        self.msg = msg;
        self.replies += 1;
    }

    /// Gathers an action; actions go out together as one `ActionBatch`.
    pub fn action(&mut self, a: Action) {
        self.actions.push(a);
    }

    /// Turns the gathered actions into one `ActionBatch` message.
    pub fn flush_actions(&mut self) {
        if self.actions.is_empty() {
            return;
        }
        let msg = PluginToHost {
            plugin_id: self.plugin_id.clone(),
            payload: Some(plugin_to_host::Payload::Actions(proto::ActionBatch {
                actions: std::mem::take(&mut self.actions),
            })),
        };
        self.encode(&msg);
        if let Some(plugin_to_host::Payload::Actions(b)) = msg.payload {
            self.actions = b.actions;
            self.actions.clear();
        }
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

    /// Sends a chat message to one player (`target_uuid`), or to everyone if it is empty.
    pub fn send_chat(&mut self, target_uuid: &str, message: &str) {
        self.send_action(action::Kind::SendChat(proto::SendChatAction {
            target_uuid: target_uuid.to_owned(),
            message: message.to_owned(),
        }));
    }

    /// Teleports a player to `position`, facing `yaw` and `pitch` (degrees; sent as the
    /// protocol's rotation `Vec3 { x: yaw, y: pitch, z: 0 }`, Dragonfly's yaw-then-pitch order).
    pub fn teleport(&mut self, player_uuid: &str, position: [f64; 3], yaw: f64, pitch: f64) {
        self.send_action(action::Kind::Teleport(proto::TeleportAction {
            player_uuid: player_uuid.to_owned(),
            position: Some(proto::Vec3 {
                x: position[0],
                y: position[1],
                z: position[2],
            }),
            rotation: Some(proto::Vec3 {
                x: yaw,
                y: pitch,
                z: 0.0,
            }),
        }));
    }

    /// Kicks a player.
    pub fn kick(&mut self, player_uuid: &str, reason: &str) {
        self.send_action(action::Kind::Kick(proto::KickAction {
            player_uuid: player_uuid.to_owned(),
            reason: reason.to_owned(),
        }));
    }

    /// Sets a player's game mode.
    pub fn set_game_mode(&mut self, player_uuid: &str, mode: GameMode) {
        self.send_action(action::Kind::SetGameMode(proto::SetGameModeAction {
            player_uuid: player_uuid.to_owned(),
            game_mode: mode as i32,
        }));
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
        self.send_action(action::Kind::SetHealth(proto::SetHealthAction {
            player_uuid: player_uuid.to_owned(),
            health,
            max_health: None,
        }));
    }

    /// Runs a command as a player.
    pub fn execute_command(&mut self, player_uuid: &str, command: &str) {
        self.send_action(action::Kind::ExecuteCommand(proto::ExecuteCommandAction {
            player_uuid: player_uuid.to_owned(),
            command: command.to_owned(),
        }));
    }

    /// Writes a line into the host's log (`level`: error, warn, info, debug, trace).
    pub fn log(&mut self, level: &str, message: &str) {
        self.out.push(plugin_to_host::Payload::Log(LogMessage {
            level: level.to_owned(),
            message: message.to_owned(),
        }));
    }

    /// Replaces the subscription set (`EventType::All` means every event).
    pub fn subscribe(&mut self, events: &[EventType]) {
        self.out.push(plugin_to_host::Payload::Subscribe(EventSubscribe {
            events: events.iter().map(|e| *e as i32).collect(),
        }));
    }
}
