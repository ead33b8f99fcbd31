//! The record ring: fixed-size records, read in place.
//!
//! Positions count records. The producer pushes one record, or a batch with a single `tail`
//! publish. The consumer borrows the readable records in place through a [`ReadGuard`] (`&[T]`
//! straight out of the region, no copy) and `head` advances when the guard is committed or
//! dropped.
//!
//! **Wrap-around.** A guard lends one contiguous run: from `head` up to `tail` or up to the end
//! of the data area, whichever comes first. Records after the wrap point come with the next read
//! (a batch push may itself wrap; it is still one publish). So a reader that wants everything
//! loops until a read comes back empty; it never sees a copy or a split record.
//!
//! ```
//! use plugbus::ring::{record, RegionRef};
//!
//! let (mut tx, mut rx) = record::channel::<u64>(RegionRef::heap(record::region_size::<u64>(8))).unwrap();
//! assert_eq!(tx.push_slice(&[1, 2, 3]).unwrap(), 3);
//! let batch = rx.read(usize::MAX).unwrap();
//! assert_eq!(&*batch, &[1, 2, 3]);
//! batch.commit();
//! assert!(rx.try_pop().unwrap().is_none());
//! ```

use std::marker::PhantomData;
use std::ptr::NonNull;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{CONTROL_SIZE, LINE, RegionRef, RingControl, RingError, RingLayoutError, check_region, control};
use crate::sync::Ordering;

/// What a record ring can carry: plain bytes with no padding, no pointers, no interior
/// mutability, any bit pattern valid (so a record read from shared memory is always a value).
pub trait Record: FromBytes + IntoBytes + Immutable + KnownLayout + Copy + Send + 'static {}
impl<T: FromBytes + IntoBytes + Immutable + KnownLayout + Copy + Send + 'static> Record for T {}

/// Bytes needed for a record ring of `capacity` records (`capacity` a power of two).
pub const fn region_size<T>(capacity: usize) -> usize {
    CONTROL_SIZE + capacity * std::mem::size_of::<T>()
}

/// Initializes `region` as an empty ring and returns both ends (same process).
pub fn channel<T: Record>(region: RegionRef) -> Result<(Producer<T>, Consumer<T>), RingLayoutError> {
    check_layout::<T>(&region)?;
    super::init(&region)?;
    Ok((Producer::attach(region.clone())?, Consumer::attach(region)?))
}

fn check_layout<T>(region: &RegionRef) -> Result<u64, RingLayoutError> {
    let (size, align) = (std::mem::size_of::<T>(), std::mem::align_of::<T>());
    if size == 0 || align > LINE {
        return Err(RingLayoutError::BadRecordType { size, align });
    }
    check_region(region, size)
}

/// Shared by both ends: the region, its data area, and the capacity.
struct Ring<T> {
    region: RegionRef,
    data: NonNull<T>,
    capacity: u64,
    _t: PhantomData<T>,
}

impl<T: Record> Ring<T> {
    fn new(region: RegionRef) -> Result<Self, RingLayoutError> {
        let capacity = check_layout::<T>(&region)?;
        // SAFETY: check_region proved region.len() >= CONTROL_SIZE + size_of::<T>(), so the
        // offset stays inside the region; the base is LINE-aligned and CONTROL_SIZE is a multiple
        // of LINE >= align_of::<T>(), so the data pointer is aligned for T.
        let data = unsafe { NonNull::new_unchecked(region.as_ptr().add(CONTROL_SIZE)).cast::<T>() };
        Ok(Self {
            region,
            data,
            capacity,
            _t: PhantomData,
        })
    }

    #[inline]
    fn control(&self) -> &RingControl {
        control(&self.region)
    }

    #[inline]
    fn index(&self, pos: u64) -> usize {
        (pos & (self.capacity - 1)) as usize
    }
}

/// The writing end of a record ring. One per ring, in one thread at a time.
pub struct Producer<T> {
    ring: Ring<T>,
    /// Our own position (the shared `tail` is only ever written from this copy).
    tail: u64,
    /// Last `head` read from the region; refreshed only when the ring looks full.
    cached_head: u64,
    poison: Option<RingError>,
}

// SAFETY: a Producer is the unique writer of its ring; the region it points into is Send + Sync
// (RegionRef) and T is Send.
unsafe impl<T: Send> Send for Producer<T> {}

/// Why a push did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError<T> {
    /// No free slot: the consumer is behind. The record is handed back.
    #[error("ring full")]
    Full(T),
    /// The ring is broken (see [`RingError`]); the record is dropped.
    #[error(transparent)]
    Broken(#[from] RingError),
}

impl<T: Record> Producer<T> {
    /// Attaches the writing end to an initialized ring region, continuing from its current tail.
    pub fn attach(region: RegionRef) -> Result<Self, RingLayoutError> {
        let ring = Ring::<T>::new(region)?;
        // Acquire: pairs with the Release stores of a previous producer / the consumer, so a
        // resumed producer starts from positions whose data it can see.
        let tail = ring.control().tail.load(Ordering::Acquire);
        let head = ring.control().head.load(Ordering::Acquire);
        let mut p = Self {
            ring,
            tail,
            cached_head: head,
            poison: None,
        };
        if head > tail || tail - head > p.ring.capacity {
            p.poison = Some(RingError::HeadOutOfRange {
                head,
                tail,
                last_head: head,
            });
        }
        Ok(p)
    }

    /// Capacity in records.
    pub fn capacity(&self) -> usize {
        self.ring.capacity as usize
    }

    /// The first protocol violation seen, if any.
    pub fn poisoned(&self) -> Option<RingError> {
        self.poison
    }

    /// Number of records that fit, refreshing the consumer's `head` if fewer than `want` are
    /// known to be free. "Possibly full -> refresh -> really full".
    #[inline]
    fn free(&mut self, want: u64) -> Result<u64, RingError> {
        if let Some(e) = self.poison {
            return Err(e);
        }
        let free = self.ring.capacity - (self.tail - self.cached_head);
        if free >= want {
            return Ok(free);
        }
        // Acquire: pairs with the consumer's Release store of `head` in `ReadGuard::release`,
        // so its reads of the slots we are about to overwrite happened before our writes.
        let head = self.ring.control().head.load(Ordering::Acquire);
        if head < self.cached_head || head > self.tail {
            let e = RingError::HeadOutOfRange {
                head,
                tail: self.tail,
                last_head: self.cached_head,
            };
            self.poison = Some(e);
            return Err(e);
        }
        self.cached_head = head;
        Ok(self.ring.capacity - (self.tail - head))
    }

    /// Pushes one record, or hands it back if the ring is full.
    #[inline]
    pub fn try_push(&mut self, value: T) -> Result<(), PushError<T>> {
        if self.free(1)? == 0 {
            return Err(PushError::Full(value));
        }
        let i = self.ring.index(self.tail);
        self.ring.control().tracker.write(i as u64, 1);
        // SAFETY: i < capacity, so the slot is inside the data area (Ring::new); the slot lies in
        // [tail, head + capacity), which the consumer does not read until we publish it below.
        unsafe { self.ring.data.as_ptr().add(i).write(value) };
        self.tail += 1;
        // Release: pairs with the consumer's Acquire load of `tail` in `Consumer::available`,
        // so the record written above is visible before the new tail.
        self.ring.control().tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Pushes as many records of `values` as fit, with one `tail` publish; returns how many.
    pub fn push_slice(&mut self, values: &[T]) -> Result<usize, RingError> {
        if let Some(e) = self.poison {
            return Err(e);
        }
        if values.is_empty() {
            return Ok(0);
        }
        let n = (self.free(values.len() as u64)? as usize).min(values.len());
        if n == 0 {
            return Ok(0);
        }
        let start = self.ring.index(self.tail);
        let first = n.min(self.ring.capacity as usize - start);
        self.ring.control().tracker.write(start as u64, first as u64);
        self.ring.control().tracker.write(0, (n - first) as u64);
        // SAFETY: start + first <= capacity and n - first <= capacity: both runs are inside the
        // data area. They cover [tail, tail + n) with n <= free, so the consumer is not reading
        // them; `values` is a separate borrow, so the copies do not overlap.
        unsafe {
            let data = self.ring.data.as_ptr();
            std::ptr::copy_nonoverlapping(values.as_ptr(), data.add(start), first);
            std::ptr::copy_nonoverlapping(values.as_ptr().add(first), data, n - first);
        }
        self.tail += n as u64;
        // Release: pairs with the consumer's Acquire load of `tail`: the whole batch is visible
        // before the one publish.
        self.ring.control().tail.store(self.tail, Ordering::Release);
        Ok(n)
    }
}

/// The reading end of a record ring. One per ring, in one thread at a time.
pub struct Consumer<T> {
    ring: Ring<T>,
    /// Our own position (the shared `head` is only ever written from this copy).
    head: u64,
    /// Last `tail` read from the region; refreshed only when the ring looks empty.
    cached_tail: u64,
    poison: Option<RingError>,
}

// SAFETY: a Consumer is the unique reader of its ring; see Producer.
unsafe impl<T: Send> Send for Consumer<T> {}

impl<T: Record> Consumer<T> {
    /// Attaches the reading end to an initialized ring region, continuing from its current head.
    pub fn attach(region: RegionRef) -> Result<Self, RingLayoutError> {
        let ring = Ring::<T>::new(region)?;
        // Acquire: pairs with the Release stores of the producer / a previous consumer.
        let head = ring.control().head.load(Ordering::Acquire);
        Ok(Self {
            ring,
            head,
            cached_tail: head,
            poison: None,
        })
    }

    /// Capacity in records.
    pub fn capacity(&self) -> usize {
        self.ring.capacity as usize
    }

    /// The first protocol violation seen, if any.
    pub fn poisoned(&self) -> Option<RingError> {
        self.poison
    }

    /// Records readable now, refreshing the producer's `tail` if the cache says empty.
    #[inline]
    pub fn available(&mut self) -> Result<u64, RingError> {
        if let Some(e) = self.poison {
            return Err(e);
        }
        if self.cached_tail != self.head {
            return Ok(self.cached_tail - self.head);
        }
        // Acquire: pairs with the producer's Release store of `tail` in `try_push` /
        // `push_slice`, so the records below the new tail are visible.
        let tail = self.ring.control().tail.load(Ordering::Acquire);
        let e = if tail < self.cached_tail {
            RingError::TailMovedBack {
                last: self.cached_tail,
                now: tail,
            }
        } else if tail - self.head > self.ring.capacity {
            RingError::TailOutOfRange {
                head: self.head,
                tail,
                capacity: self.ring.capacity,
            }
        } else {
            self.cached_tail = tail;
            return Ok(tail - self.head);
        };
        self.poison = Some(e);
        Err(e)
    }

    /// Borrows up to `max` readable records in place (one contiguous run; see the module docs
    /// on wrap-around). The guard may be empty.
    #[inline]
    pub fn read(&mut self, max: usize) -> Result<ReadGuard<'_, T>, RingError> {
        let avail = self.available()?;
        let start = self.ring.index(self.head);
        let len = (avail as usize).min(self.ring.capacity as usize - start).min(max);
        self.ring.control().tracker.read(start as u64, len as u64);
        // SAFETY: start + len <= capacity, inside the data area and aligned for T (Ring::new).
        // Positions [head, head + len) are below the tail we acquired, so the producer wrote
        // them before publishing and will not touch them until we release `head`. T: FromBytes,
        // so whatever bytes are there form valid T values.
        let records = unsafe { std::slice::from_raw_parts(self.ring.data.as_ptr().add(start), len) };
        Ok(ReadGuard {
            records,
            release: len,
            consumer: self,
        })
    }

    /// Pops one record by copy.
    #[inline]
    pub fn try_pop(&mut self) -> Result<Option<T>, RingError> {
        let guard = self.read(1)?;
        Ok(guard.first().copied())
    }

    #[inline]
    fn release(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.head += n as u64;
        // Release: pairs with the producer's Acquire load of `head` in `Producer::free`, so our
        // reads of these slots happen before the producer overwrites them.
        self.ring.control().head.store(self.head, Ordering::Release);
    }
}

/// Records lent in place by [`Consumer::read`]. Dropping or committing the guard releases them
/// to the producer (advances `head`); [`ReadGuard::consume`] releases only part.
pub struct ReadGuard<'a, T: Record> {
    records: &'a [T],
    release: usize,
    consumer: &'a mut Consumer<T>,
}

impl<T: Record> ReadGuard<'_, T> {
    /// Releases every lent record.
    pub fn commit(self) {}

    /// Releases only the first `n` lent records (clamped to the guard's length); the rest are
    /// read again by the next `read`.
    pub fn consume(mut self, n: usize) {
        self.release = n.min(self.records.len());
    }
}

impl<T: Record> std::ops::Deref for ReadGuard<'_, T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        self.records
    }
}

impl<T: Record> Drop for ReadGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.consumer.release(self.release);
    }
}
