//! [`RegionRef`]: a byte region a ring lives in, kept alive by whoever owns it.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;

/// A shared handle to a byte region: a slice of a shared mapping, or a heap buffer (tests,
/// benches, in-process use). Cloning it is cheap; the region lives while any clone does.
///
/// The region is accessed only through the ring protocol (atomics for positions, raw copies for
/// payload), never through `&[u8]` of the whole region, because another process may write it.
#[derive(Clone)]
pub struct RegionRef {
    base: NonNull<u8>,
    len: usize,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: RegionRef is a pointer plus a keep-alive; the memory it designates is only accessed
// through atomics and through the SPSC ring protocol, which hands each byte to one side at a
// time. The owner is Send + Sync.
unsafe impl Send for RegionRef {}
// SAFETY: as for Send: shared access goes through atomics or the ring protocol.
unsafe impl Sync for RegionRef {}

impl std::fmt::Debug for RegionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionRef")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

/// A zeroed, page-aligned heap allocation.
struct HeapRegion {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: HeapRegion exclusively owns its allocation; it has no thread affinity.
unsafe impl Send for HeapRegion {}
// SAFETY: HeapRegion itself never touches the bytes; RegionRef's users do, under the ring protocol.
unsafe impl Sync for HeapRegion {}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with this layout and is freed once, here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl RegionRef {
    /// A zeroed heap region of `len` bytes, aligned to a page.
    ///
    /// # Panics
    /// If `len` is 0 or the allocation fails.
    pub fn heap(len: usize) -> Self {
        assert!(len > 0, "a region needs at least one byte");
        let layout = Layout::from_size_align(len, 4096).expect("region layout");
        // SAFETY: layout has a non-zero size (asserted above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let owner = Arc::new(HeapRegion { ptr, layout });
        Self {
            base: ptr,
            len,
            _owner: owner,
        }
    }

    /// A region over memory kept alive by `owner`.
    ///
    /// # Safety
    /// `base..base + len` must be valid for reads and writes for as long as `owner` lives, and
    /// must not be accessed except through atomics or ring protocols while any clone exists.
    pub unsafe fn from_raw_parts(base: NonNull<u8>, len: usize, owner: Arc<dyn Send + Sync>) -> Self {
        Self {
            base,
            len,
            _owner: owner,
        }
    }

    /// A sub-region `offset..offset + len` sharing this region's owner, or `None` if it does
    /// not fit.
    pub fn slice(&self, offset: usize, len: usize) -> Option<Self> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset <= end <= self.len, so the result stays inside this region's allocation.
        let base = unsafe { self.base.add(offset) };
        Some(Self {
            base,
            len,
            _owner: Arc::clone(&self._owner),
        })
    }

    /// The first byte of the region.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Length in bytes.
    #[inline]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }
}
