//! Typed handles: what a C caller holds for a plugin connection, an event or a host is a
//! token, not an address.
//!
//! A token is a pointer-sized number that encodes a kind tag, a slot index and the slot's
//! generation. It is decoded and checked against the registry of its kind before anything is
//! touched, and nothing is ever read through the caller's pointer: a made-up pointer, a handle
//! of another kind (an event passed to a connection function, a host passed to a plugin
//! function, ...) or a closed handle is an error with a message saying which, never a read of
//! memory of the wrong type. Closing a handle frees what it holds and bumps its slot's
//! generation, so an old token is recognized as stale even after the slot is reused.
//!
//! Token layout (64 bits): `MAGIC` in bits 63..56, the kind in 55..48, the generation in
//! 47..20, the slot index in 19..4, zeros in 3..0. Tokens are never NULL, 16-aligned, and lie
//! above 2^48: outside any user-space mapping, so they are never taken for a real address
//! (Go's garbage collector, which sees them in `*C.plugbus_*` values, ignores them), and C code
//! that dereferences one (it is opaque, so it cannot by accident) faults at once.
//!
//! A stale token can only be mistaken for a live one of the same kind after its slot was reused
//! 2^28 times; even then it names a live handle of the right kind, so no memory is misread.

use std::cell::Cell;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Error, PLUGBUS_ERR_CLOSED, PLUGBUS_ERR_INVALID_ARGUMENT};
use crate::sync::{AtomicUsize, Ordering};

const _: () = assert!(usize::BITS == 64, "plugbus handle tokens are 64-bit");

/// Bits 63..56 of every token.
const MAGIC: usize = 0x50;
const MAGIC_SHIFT: u32 = 56;
const KIND_SHIFT: u32 = 48;
const GEN_SHIFT: u32 = 20;
const GEN_MASK: u32 = (1 << 28) - 1;
const INDEX_SHIFT: u32 = 4;
/// Live handles of one kind at most (slot indexes are 16 bits).
const MAX_SLOTS: usize = 1 << 16;

/// What a handle stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `plugbus_plugin`: a plugin's connection.
    Plugin = 1,
    /// `plugbus_event`: the event passed to `on_event` (it lives in its connection's slot).
    Event = 2,
    /// `plugbus_host`: an embedded host.
    Host = 3,
}

impl Kind {
    fn from_tag(tag: usize) -> Option<Self> {
        match tag {
            1 => Some(Self::Plugin),
            2 => Some(Self::Event),
            3 => Some(Self::Host),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Plugin => "plugin",
            Self::Event => "event",
            Self::Host => "host",
        }
    }

    /// Where a handle of this kind comes from, for the message about a made-up pointer.
    fn origin(self) -> &'static str {
        match self {
            Self::Plugin => "never returned by plugbus_open or plugbus_open_env",
            Self::Event => "never passed to on_event",
            Self::Host => "never returned by plugbus_host_start",
        }
    }

    /// What a stale handle of this kind means.
    fn stale(self) -> &'static str {
        match self {
            Self::Plugin => "stale plugin handle: it was already closed with plugbus_close",
            Self::Event => "stale event handle: the event's handle was closed with plugbus_close",
            Self::Host => "stale host handle: the host was already shut down with plugbus_host_shutdown",
        }
    }
}

/// A decoded token: which slot of which kind, at which generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    pub kind: Kind,
    index: u32,
    generation: u32,
}

impl Token {
    /// The pointer-sized value handed to C.
    pub fn encode(self) -> usize {
        (MAGIC << MAGIC_SHIFT)
            | ((self.kind as usize) << KIND_SHIFT)
            | ((self.generation as usize) << GEN_SHIFT)
            | ((self.index as usize) << INDEX_SHIFT)
    }

    /// An event token of no connection (the fuzz harnesses' lent events): the last slot, a
    /// generation no registry hands out before it has reused that slot 2^28 - 1 times.
    pub fn unregistered_event() -> Self {
        Self {
            kind: Kind::Event,
            index: (MAX_SLOTS - 1) as u32,
            generation: GEN_MASK,
        }
    }

    /// The same slot and generation as another kind (a connection's event).
    pub fn as_kind(self, kind: Kind) -> Self {
        Self { kind, ..self }
    }

    /// The token as the opaque pointer type C holds (never dereferenced: it is not an address).
    pub fn as_ptr<T>(self) -> *mut T {
        std::ptr::without_provenance_mut(self.encode())
    }

    /// Decodes `p` as a handle of kind `want`, looking only at the pointer's value.
    /// `PLUGBUS_ERR_NULL_POINTER` for NULL; `PLUGBUS_ERR_CLOSED` for a value that is no plugbus
    /// token or a token of another kind.
    pub fn decode<T>(p: *const T, want: Kind) -> Result<Self, Error> {
        let v = p as usize;
        if v == 0 {
            return Err(Error::null(&format!("the {} handle", want.name())));
        }
        let kind = if v >> MAGIC_SHIFT == MAGIC && v & ((1 << INDEX_SHIFT) - 1) == 0 {
            Kind::from_tag((v >> KIND_SHIFT) & 0xff)
        } else {
            None
        };
        let Some(kind) = kind else {
            return Err(Error::new(
                PLUGBUS_ERR_CLOSED,
                format!("not a plugbus {} handle ({})", want.name(), want.origin()),
            ));
        };
        if kind != want {
            return Err(Error::new(
                PLUGBUS_ERR_CLOSED,
                format!(
                    "not a plugbus {} handle: this is a plugbus {} handle, passed to a function of another kind",
                    want.name(),
                    kind.name()
                ),
            ));
        }
        Ok(Self {
            kind,
            index: ((v >> INDEX_SHIFT) & (MAX_SLOTS - 1)) as u32,
            generation: ((v >> GEN_SHIFT) as u32) & GEN_MASK,
        })
    }

    /// The error for this token when its slot holds no live handle of its generation.
    pub fn stale_error(self) -> Error {
        Error::new(PLUGBUS_ERR_CLOSED, self.kind.stale())
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<Arc<T>>,
}

struct Slots<T> {
    slots: Vec<Slot<T>>,
    /// Indexes of vacant slots, reused before the table grows.
    free: Vec<u32>,
}

/// The live handles of one kind (a table of slots, each with a generation). Lookups lock a
/// mutex held for a few instructions, compare a generation and clone an `Arc`: no allocation.
pub(crate) struct Registry<T> {
    kind: Kind,
    inner: Mutex<Slots<T>>,
}

impl<T> Registry<T> {
    /// An empty registry of handles of `kind`.
    pub const fn new(kind: Kind) -> Self {
        Self {
            kind,
            inner: Mutex::new(Slots {
                slots: Vec::new(),
                free: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots<T>> {
        // Nothing panics while the lock is held, but a poisoned table is still consistent:
        // every update is a single assignment.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `value` and returns its token.
    pub fn insert(&self, value: Arc<T>) -> Result<Token, Error> {
        let mut s = self.lock();
        let index = match s.free.pop() {
            Some(i) => i,
            None if s.slots.len() < MAX_SLOTS => {
                s.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                (s.slots.len() - 1) as u32
            }
            None => {
                return Err(Error::new(
                    PLUGBUS_ERR_INVALID_ARGUMENT,
                    format!(
                        "too many open plugbus {} handles (at most {MAX_SLOTS})",
                        self.kind.name()
                    ),
                ));
            }
        };
        let slot = &mut s.slots[index as usize];
        slot.value = Some(value);
        Ok(Token {
            kind: self.kind,
            index,
            generation: slot.generation,
        })
    }

    /// The live handle `t` names, if its slot still holds the generation the token carries.
    /// `t` may be of another kind sharing this registry's slots (a connection's event).
    pub fn get(&self, t: Token) -> Result<Arc<T>, Error> {
        let s = self.lock();
        match s.slots.get(t.index as usize) {
            Some(Slot {
                generation,
                value: Some(v),
            }) if *generation == t.generation => Ok(Arc::clone(v)),
            _ => Err(t.stale_error()),
        }
    }

    /// Whether `t` names a live handle.
    pub fn is_live(&self, t: Token) -> bool {
        let s = self.lock();
        matches!(s.slots.get(t.index as usize), Some(Slot { generation, value: Some(_) }) if *generation == t.generation)
    }

    /// Removes the handle `t` names (its token and every copy of it become stale) and returns
    /// it; `None` if it was not live.
    pub fn remove(&self, t: Token) -> Option<Arc<T>> {
        let mut s = self.lock();
        let slot = s.slots.get_mut(t.index as usize)?;
        if slot.generation != t.generation || slot.value.is_none() {
            return None;
        }
        let v = slot.value.take();
        slot.generation = (slot.generation + 1) & GEN_MASK;
        s.free.push(t.index);
        v
    }
}

/// A value used by one thread at a time, reentrantly (a callback may call back into the API on
/// the same handle): a call claims it for its thread, a call from another thread while it is
/// claimed is refused (`PLUGBUS_ERR_BAD_STATE`), never run beside it. This is what makes a
/// handle whose state lives in cells safe to keep in a registry shared by every thread.
pub(crate) struct Exclusive<T> {
    /// The claiming thread's id ([`thread_id`]), 0 when unclaimed.
    owner: AtomicUsize,
    /// Nested claims by the owner (written only by the owner).
    depth: Cell<u32>,
    value: T,
}

// SAFETY: `value` and `depth` are reached only through `Claim`, which exists only on the thread
// recorded in `owner` (claimed by compare-exchange from 0, released by the last claim's drop),
// so no two threads ever touch them at the same time; the value itself may move between
// threads (`T: Send`).
unsafe impl<T: Send> Sync for Exclusive<T> {}

/// An id for the calling thread, unique among live threads: the address of a thread-local.
fn thread_id() -> usize {
    thread_local! {
        static ME: u8 = const { 0 };
    }
    ME.with(|m| std::ptr::from_ref(m).addr())
}

impl<T> Exclusive<T> {
    pub fn new(value: T) -> Self {
        Self {
            owner: AtomicUsize::new(0),
            depth: Cell::new(0),
            value,
        }
    }

    /// Claims the value for this thread (again, if it already holds it). `what` names it in
    /// the error ("plugin handle").
    pub fn claim(self: Arc<Self>, what: &str) -> Result<Claim<T>, Error> {
        let me = thread_id();
        // Acquire (success): pairs with the Release store in `Claim::drop` of the thread that
        // held it before, so its writes to the value are visible here.
        match self.owner.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => {}
            Err(owner) if owner == me => {}
            Err(_) => {
                return Err(Error::bad_state(format!(
                    "another thread is using this {what} (a handle is used by one thread at a time)"
                )));
            }
        }
        self.depth.set(self.depth.get() + 1);
        Ok(Claim { inner: self })
    }
}

/// A claim on an [`Exclusive`] by the current thread; derefs to the value.
pub(crate) struct Claim<T> {
    inner: Arc<Exclusive<T>>,
}

impl<T> std::ops::Deref for Claim<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner.value
    }
}

impl<T> Drop for Claim<T> {
    fn drop(&mut self) {
        let d = self.inner.depth.get() - 1;
        self.inner.depth.set(d);
        if d == 0 {
            // Release: pairs with the Acquire compare-exchange in `Exclusive::claim` of the next
            // thread, which then sees everything this thread wrote.
            self.inner.owner.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_other_kinds_and_junk() {
        let reg: Registry<u32> = Registry::new(Kind::Plugin);
        let t = reg.insert(Arc::new(7)).unwrap();
        let p: *mut u8 = t.as_ptr();
        assert!(p as usize >= 1 << 48, "above every user-space address");
        assert_eq!(Token::decode(p, Kind::Plugin).unwrap(), t);
        assert_eq!(*reg.get(t).unwrap(), 7);
        let e = Token::decode(p, Kind::Host).unwrap_err();
        assert!(e.message.contains("this is a plugbus plugin handle"), "{}", e.message);
        let ev = t.as_kind(Kind::Event);
        assert_eq!(Token::decode(ev.as_ptr::<u8>(), Kind::Event).unwrap(), ev);
        assert!(reg.is_live(ev));
        let local = 0u64;
        let e = Token::decode(&raw const local, Kind::Plugin).unwrap_err();
        assert!(e.message.contains("never returned by plugbus_open"), "{}", e.message);
        assert!(Token::decode(std::ptr::without_provenance::<u8>(p as usize + 1), Kind::Plugin).is_err());
        assert_eq!(
            Token::decode(std::ptr::null::<u8>(), Kind::Plugin).unwrap_err().code,
            super::super::PLUGBUS_ERR_NULL_POINTER
        );

        // Closed: stale, also once the slot is reused by a newer handle.
        assert_eq!(reg.remove(t).map(|v| *v), Some(7));
        assert!(reg.remove(t).is_none());
        assert!(reg.get(t).unwrap_err().message.contains("stale plugin handle"));
        let t2 = reg.insert(Arc::new(8)).unwrap();
        assert_ne!(t2, t, "same slot, new generation");
        assert!(reg.get(t).is_err());
        assert!(!reg.is_live(ev));
        assert_eq!(*reg.get(t2).unwrap(), 8);
    }

    #[test]
    fn a_claim_is_reentrant_on_its_thread_and_refused_on_another() {
        let x = Arc::new(Exclusive::new(5u32));
        let outer = Arc::clone(&x).claim("h").unwrap();
        let inner = Arc::clone(&x).claim("h").unwrap();
        assert_eq!(*inner, 5);
        let other = Arc::clone(&x);
        let refused = std::thread::spawn(move || other.claim("h").err().map(|e| (e.code, e.message)))
            .join()
            .unwrap();
        let (code, message) = refused.expect("refused while claimed");
        assert_eq!(code, super::super::PLUGBUS_ERR_BAD_STATE);
        assert!(message.contains("another thread"), "{message}");
        drop(inner);
        drop(outer);
        let other = Arc::clone(&x);
        assert!(std::thread::spawn(move || other.claim("h").is_ok()).join().unwrap());
    }
}
