//! A simulated game world: players walking and looking around, chatting now and then, joining
//! and leaving, running commands, jumping and breaking blocks. Deterministic (seeded), and
//! allocation-free per tick in steady state: events are built in pooled envelopes.

use plugbus::codec::EnvelopePool;
use plugbus::fastpath::MoveRecord;
use plugbus::proto::{EventEnvelope, EventType, event_envelope::Payload};

/// xorshift64*: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

struct Player {
    uuid: [u8; 16],
    uuid_text: String,
    name: String,
    pos: [f64; 3],
    heading: f64,
    yaw: f32,
    pitch: f32,
    online: bool,
}

/// Rates per online player per second.
#[derive(Clone, Copy)]
pub struct Rates {
    pub chat: f64,
    pub command: f64,
    pub other: f64,
    pub churn: f64,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            chat: 0.1,
            command: 0.01,
            other: 1.0,
            churn: 0.005,
        }
    }
}

/// What one tick produced. Envelopes come from the world's pool; give them back with
/// [`World::recycle`].
#[derive(Default)]
pub struct TickOutput {
    pub moves: Vec<MoveRecord>,
    /// Fire-and-forget events (joins, quits, jumps, block breaks...).
    pub events: Vec<EventEnvelope>,
    /// Events that expect a response (chats, commands).
    pub requests: Vec<EventEnvelope>,
}

pub struct World {
    players: Vec<Player>,
    rng: Rng,
    tps: f64,
    rates: Rates,
    pool: EnvelopePool,
    chat_lines: [&'static str; 6],
}

const WORLD: &str = "overworld";

impl World {
    pub fn new(players: usize, tps: u32, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let players = (0..players)
            .map(|i| {
                let uuid = uuid::Uuid::from_u64_pair(0x706c_7567_6275_7300 | (i as u64 >> 32), i as u64).into_bytes();
                Player {
                    uuid,
                    uuid_text: uuid::Uuid::from_bytes(uuid).hyphenated().to_string(),
                    name: format!("player{i}"),
                    pos: [rng.unit() * 512.0, 64.0, rng.unit() * 512.0],
                    heading: rng.unit() * std::f64::consts::TAU,
                    yaw: 0.0,
                    pitch: 0.0,
                    online: true,
                }
            })
            .collect();
        Self {
            players,
            rng,
            tps: f64::from(tps.max(1)),
            rates: Rates::default(),
            pool: EnvelopePool::new(256),
            chat_lines: [
                "hello everyone",
                "anyone want to trade diamonds?",
                "what the heck was that",
                "oh darn, I fell in lava",
                "gg",
                "where is spawn?",
            ],
        }
    }

    /// Advances one tick, filling `out` (cleared first).
    pub fn step(&mut self, out: &mut TickOutput) {
        out.moves.clear();
        let per_tick = 1.0 / self.tps;
        for i in 0..self.players.len() {
            // Churn: leave, or come back.
            if self.rng.chance(self.rates.churn * per_tick) {
                let online = !self.players[i].online;
                self.players[i].online = online;
                let ty = if online {
                    EventType::PlayerJoin
                } else {
                    EventType::PlayerQuit
                };
                let mut env = self.pool.take(ty);
                let p = &self.players[i];
                match &mut env.payload {
                    Some(Payload::PlayerJoin(j)) => {
                        j.player_uuid.push_str(&p.uuid_text);
                        j.name.push_str(&p.name);
                        let w = j.world.get_or_insert_with(Default::default);
                        w.name.clear();
                        w.name.push_str(WORLD);
                    }
                    Some(Payload::PlayerQuit(q)) => {
                        q.player_uuid.push_str(&p.uuid_text);
                        q.name.push_str(&p.name);
                    }
                    _ => {}
                }
                out.events.push(env);
            }
            if !self.players[i].online {
                continue;
            }
            // Walk and look around.
            let turn = (self.rng.unit() - 0.5) * 0.3;
            let p = &mut self.players[i];
            p.heading += turn;
            let speed = 4.3 * per_tick;
            p.pos[0] += p.heading.cos() * speed;
            p.pos[2] += p.heading.sin() * speed;
            p.yaw = (p.heading.to_degrees() as f32).rem_euclid(360.0);
            p.pitch = ((self.rng.unit() - 0.5) * 20.0) as f32;
            out.moves.push(MoveRecord::new(p.uuid, p.pos, p.yaw, p.pitch));
            if self.rng.chance(self.rates.chat * per_tick) {
                let line = self.chat_lines[self.rng.below(self.chat_lines.len())];
                let mut env = self.pool.take(EventType::Chat);
                let p = &self.players[i];
                if let Some(Payload::Chat(c)) = &mut env.payload {
                    c.player_uuid.push_str(&p.uuid_text);
                    c.name.push_str(&p.name);
                    c.message.push_str(line);
                }
                out.requests.push(env);
            }
            if self.rng.chance(self.rates.command * per_tick) {
                let mut env = self.pool.take(EventType::Command);
                let p = &self.players[i];
                if let Some(Payload::Command(c)) = &mut env.payload {
                    c.player_uuid.push_str(&p.uuid_text);
                    c.name.push_str(&p.name);
                    c.raw.push_str("/filterstats");
                    c.command.push_str("filterstats");
                }
                out.requests.push(env);
            }
            if self.rng.chance(self.rates.other * per_tick) {
                let kind = self.rng.below(3);
                let p = &self.players[i];
                let env = match kind {
                    0 => {
                        let mut env = self.pool.take(EventType::PlayerJump);
                        if let Some(Payload::PlayerJump(j)) = &mut env.payload {
                            j.player_uuid.push_str(&p.uuid_text);
                            j.name.push_str(&p.name);
                            j.world.push_str(WORLD);
                            j.position = Some(plugbus::proto::Vec3 {
                                x: p.pos[0],
                                y: p.pos[1],
                                z: p.pos[2],
                            });
                        }
                        env
                    }
                    1 => {
                        let mut env = self.pool.take(EventType::PlayerToggleSprint);
                        if let Some(Payload::PlayerToggleSprint(t)) = &mut env.payload {
                            t.player_uuid.push_str(&p.uuid_text);
                            t.name.push_str(&p.name);
                            t.after = true;
                        }
                        env
                    }
                    _ => {
                        let mut env = self.pool.take(EventType::PlayerBlockBreak);
                        if let Some(Payload::BlockBreak(b)) = &mut env.payload {
                            b.player_uuid.push_str(&p.uuid_text);
                            b.name.push_str(&p.name);
                            b.world.push_str(WORLD);
                            b.position = Some(plugbus::proto::BlockPos {
                                x: p.pos[0] as i32,
                                y: 63,
                                z: p.pos[2] as i32,
                            });
                        }
                        env
                    }
                };
                out.events.push(env);
            }
        }
    }

    /// Returns a tick's envelopes to the pool.
    pub fn recycle(&mut self, out: &mut TickOutput) {
        for env in out.events.drain(..).chain(out.requests.drain(..)) {
            self.pool.give(env);
        }
    }
}

/// Whether an event type is critical (never dropped, delivered in order): join, quit, chat,
/// command.
pub fn is_critical(ty: i32) -> bool {
    matches!(
        EventType::try_from(ty),
        Ok(EventType::PlayerJoin | EventType::PlayerQuit | EventType::Chat | EventType::Command)
    )
}
