//! A plugin that cancels chat containing a banned word, rewrites another word, and answers a
//! command it registered (`/filterstats`).
//!
//! Started by a plugbus host (which sets `PLUGBUS_ADDRESS` and `PLUGBUS_PLUGIN_ID`).
//! Options: `--banned WORD` (default `darn`), `--rewrite FROM=TO` (default `heck=h*ck`),
//! `--wait spin|park|spin-then-park`.

use plugbus::plugin::{Context, Handler, Plugin, Reply, WaitStrategy};
use plugbus::proto::{CommandSpec, EventEnvelope, EventType, event_envelope::Payload};

struct ChatFilter {
    banned: String,
    from: String,
    to: String,
    cancelled: u64,
    rewritten: u64,
    passed: u64,
}

impl Handler for ChatFilter {
    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        match &event.payload {
            Some(Payload::Chat(chat)) => {
                let lower = chat.message.to_lowercase();
                if lower.contains(&self.banned) {
                    self.cancelled += 1;
                    ctx.send_chat(&chat.player_uuid, "Your message was blocked by the chat filter.");
                    ctx.log("info", &format!("blocked a message from {}", chat.name));
                    Reply::Cancel
                } else if lower.contains(&self.from) {
                    self.rewritten += 1;
                    Reply::chat_message(replace_ignore_case(&chat.message, &self.from, &self.to))
                } else {
                    self.passed += 1;
                    Reply::Ack
                }
            }
            // `command` is the command's name without the slash (`name` is the player's name).
            Some(Payload::Command(cmd)) if cmd.command == "filterstats" => {
                let text = format!(
                    "chat filter: {} blocked, {} rewritten, {} passed",
                    self.cancelled, self.rewritten, self.passed
                );
                ctx.send_chat(&cmd.player_uuid, &text);
                Reply::Ack
            }
            _ => Reply::Ack,
        }
    }

    fn on_shutdown(&mut self, reason: &str) {
        println!(
            "chat_filter stopping ({reason}): {} blocked, {} rewritten, {} passed",
            self.cancelled, self.rewritten, self.passed
        );
    }
}

/// Replaces every case-insensitive occurrence of `from` (ASCII) with `to`.
fn replace_ignore_case(text: &str, from: &str, to: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    for (i, _) in lower.match_indices(from) {
        out.push_str(&text[rest..i]);
        out.push_str(to);
        rest = i + from.len();
    }
    out.push_str(&text[rest..]);
    out
}

/// Runs the plugin with command-line style arguments (also used by `plugbus demo`).
pub fn run(args: Vec<String>) -> Result<(), String> {
    let mut filter = ChatFilter {
        banned: "darn".into(),
        from: "heck".into(),
        to: "h*ck".into(),
        cancelled: 0,
        rewritten: 0,
        passed: 0,
    };
    let mut wait = WaitStrategy::default();
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--banned" => filter.banned = args.next().unwrap_or_default().to_ascii_lowercase(),
            "--rewrite" => {
                let v = args.next().unwrap_or_default();
                let (f, t) = v.split_once('=').ok_or("--rewrite takes FROM=TO")?;
                filter.from = f.to_ascii_lowercase();
                filter.to = t.to_owned();
            }
            "--wait" => wait = args.next().unwrap_or_default().parse()?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Plugin::from_env()
        .and_then(|b| {
            b.name("chat_filter")
                .version(env!("CARGO_PKG_VERSION"))
                .command(CommandSpec {
                    name: "filterstats".into(),
                    description: "Shows what the chat filter did".into(),
                    ..Default::default()
                })
                .subscribe([EventType::Chat, EventType::Command])
                .wait(wait)
                .run(&mut filter)
        })
        .map_err(|e| e.to_string())
}

fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()) {
        eprintln!("chat_filter: {e}");
        std::process::exit(1);
    }
}
