//! Owned, aligned I/O buffers.
//!
//! The io_uring reactor and the thread-pool engine both need a buffer that
//! stays valid until the kernel (or a worker thread) is done with it, even if
//! the request that started the I/O is dropped. So every data-path buffer is
//! an owned [`IoBuf`] that moves into the operation and comes back with the
//! result; nothing on the data path lends a borrowed slice to the kernel.
//!
//! An `IoBuf` is a window onto a shared aligned allocation. [`IoBuf::split_to`]
//! cuts a buffer in two disjoint windows (so a request that maps to several
//! host extents reads each extent straight into its part, with no copy) and
//! [`IoBuf::unsplit`] joins neighbours again. Windows of one allocation never
//! overlap, which is what makes handing out `&mut [u8]` to each of them sound.
//!
//! Large allocations are recycled through a small per-thread pool: a 1 MiB
//! read buffer freshly taken from the system costs an `mmap`, 256 page
//! faults with the kernel clearing each page, a `memset` and a `munmap`,
//! which is as much CPU as copying the data into the socket. Only
//! [`IoBuf::for_read`] hands out recycled memory (it holds stale but
//! initialised bytes); [`IoBuf::zeroed`] always zero-fills. Allocations of
//! 2 MiB and more sit on transparent huge pages, so the device sees few,
//! large DMA segments and can merge sequential requests further.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every buffer: enough for O_DIRECT on 4 KiB-sector devices.
pub const BUF_ALIGN: usize = 4096;

/// Allocations this large are backed by transparent huge pages; see
/// [`Alloc::new_huge_zeroed`].
const HUGE_PAGE: usize = 2 << 20;

/// Smallest allocation worth recycling: below this the allocator serves
/// requests from its heap without page faults.
const POOL_MIN: usize = 64 << 10;
/// Most bytes a thread keeps for reuse: a few large requests' worth, so an
/// idle daemon holds little memory.
const POOL_MAX_BYTES: usize = 32 << 20;

/// Freed allocations kept by one thread for reuse.
#[derive(Default)]
struct Pool {
    free: Vec<Alloc>,
    bytes: usize,
}

thread_local! {
    /// Per-thread, so the data path takes no lock; a buffer freed on
    /// another thread (a thread-pool worker) simply joins that thread's
    /// pool.
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// A recycled allocation of exactly `cap` bytes, if the pool has one.
fn pool_take(cap: usize) -> Option<Alloc> {
    if cap < POOL_MIN {
        return None;
    }
    POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        let i = p.free.iter().rposition(|a| a.layout.size() == cap)?;
        p.bytes -= cap;
        Some(p.free.swap_remove(i))
    })
    .ok()
    .flatten()
}

/// Keeps `a` for reuse; gives it back when the pool is full (or the
/// thread is exiting, in which case the caller frees it).
fn pool_put(a: Alloc) -> Option<Alloc> {
    let cap = a.layout.size();
    if cap < POOL_MIN {
        return Some(a);
    }
    let mut a = Some(a);
    let _ = POOL.try_with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else {
            return;
        };
        // Oldest first: the sizes in use now are the likely ones next.
        while p.bytes + cap > POOL_MAX_BYTES && !p.free.is_empty() {
            let old = p.free.remove(0);
            p.bytes -= old.layout.size();
            old.release();
        }
        if p.bytes + cap <= POOL_MAX_BYTES {
            p.bytes += cap;
            p.free.extend(a.take());
        }
    });
    a
}

/// One aligned heap allocation shared by the windows cut from it.
struct Alloc {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: `Alloc` owns its memory exclusively; access to bytes goes through
// `IoBuf` windows, which are disjoint, so sharing the allocation handle across
// threads cannot create aliasing mutable access.
unsafe impl Send for Alloc {}
// SAFETY: as above: `&Alloc` exposes no access to the bytes.
unsafe impl Sync for Alloc {}

impl Alloc {
    /// A fresh zero-filled allocation of `cap` bytes (a multiple of
    /// [`BUF_ALIGN`]).
    fn new_zeroed(cap: usize) -> Alloc {
        if cap >= HUGE_PAGE {
            return Alloc::new_huge_zeroed(cap);
        }
        let layout = Layout::from_size_align(cap, BUF_ALIGN).expect("buffer layout");
        let ptr = if cap == 0 {
            NonNull::<u8>::dangling()
        } else {
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { alloc::alloc_zeroed(layout) };
            NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout))
        };
        Alloc { ptr, layout }
    }

    /// A zero-filled allocation aligned to [`HUGE_PAGE`] and advised for
    /// transparent huge pages. A page of 4 KiB per DMA segment caps a
    /// device request at `max_segments` pages (about 1 MiB on virtio-blk),
    /// so sequential requests from scattered small pages merge into 1 MiB
    /// device requests at best; from a huge page they merge up to the
    /// device's size limit, and large sequential writes finish sooner.
    fn new_huge_zeroed(cap: usize) -> Alloc {
        let layout = Layout::from_size_align(cap, HUGE_PAGE).expect("buffer layout");
        // SAFETY: the layout has a non-zero size (cap >= HUGE_PAGE).
        let p = unsafe { alloc::alloc(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        // SAFETY: [ptr, ptr + cap) is the allocation just made. The advice
        // must come before the first touch, which is why this does not use
        // `alloc_zeroed`; it is only a hint, so its failure (no THP in this
        // kernel) changes nothing but speed.
        unsafe {
            libc::madvise(ptr.as_ptr().cast(), cap, libc::MADV_HUGEPAGE);
            std::ptr::write_bytes(ptr.as_ptr(), 0, cap);
        }
        Alloc { ptr, layout }
    }

    /// Returns the memory to the system allocator.
    fn release(self) {
        if self.layout.size() != 0 {
            // SAFETY: `ptr` came from `alloc::alloc_zeroed` or `alloc::alloc`
            // with this same layout; `self` is consumed and `forget` below keeps
            // `Drop` from freeing it a second time.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
        std::mem::forget(self);
    }
}

impl Drop for Alloc {
    fn drop(&mut self) {
        let a = Alloc {
            ptr: self.ptr,
            layout: self.layout,
        };
        // `a` now owns the memory; `self` is not used again.
        if let Some(a) = pool_put(a) {
            a.release();
        }
    }
}

/// An owned window of aligned memory used for all data I/O.
pub struct IoBuf {
    alloc: Arc<Alloc>,
    off: usize,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes aligned to [`BUF_ALIGN`].
    pub fn zeroed(len: usize) -> Self {
        let cap = Self::cap_for(len);
        match pool_take(cap) {
            Some(a) => {
                let mut b = Self::wrap(a, len);
                b.fill(0);
                b
            }
            None => Self::wrap(Alloc::new_zeroed(cap), len),
        }
    }

    /// A buffer of `len` bytes aligned to [`BUF_ALIGN`] whose contents are
    /// unspecified (initialised, possibly stale data of an earlier request):
    /// for reads, which overwrite every byte before the buffer is used.
    pub fn for_read(len: usize) -> Self {
        let cap = Self::cap_for(len);
        let a = pool_take(cap).unwrap_or_else(|| Alloc::new_zeroed(cap));
        Self::wrap(a, len)
    }

    /// The allocation size for `len` bytes: rounded up so that the tail of
    /// an O_DIRECT transfer never reaches outside it.
    fn cap_for(len: usize) -> usize {
        len.div_ceil(BUF_ALIGN) * BUF_ALIGN
    }

    fn wrap(a: Alloc, len: usize) -> Self {
        IoBuf {
            alloc: Arc::new(a),
            off: 0,
            len,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::for_read(data.len());
        b.copy_from_slice(data);
        b
    }

    /// A buffer of `len` bytes, each set to `byte`.
    pub fn filled(len: usize, byte: u8) -> Self {
        let mut b = Self::for_read(len);
        b.fill(byte);
        b
    }

    /// Length of this window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer to the first byte, for handing to the kernel. The pointer
    /// is valid for `len()` bytes for as long as this `IoBuf` lives.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: `off <= layout.size()`, so the result stays inside (or one
        // past) the allocation.
        unsafe { self.alloc.ptr.as_ptr().add(self.off) }
    }

    /// Mutable raw pointer to the first byte (see [`IoBuf::as_ptr`]).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: as in `as_ptr`.
        unsafe { self.alloc.ptr.as_ptr().add(self.off) }
    }

    /// Whether the window start is aligned to `align` bytes (a power of two).
    pub fn is_aligned(&self, align: usize) -> bool {
        (self.as_ptr() as usize).is_multiple_of(align)
    }

    /// Cuts off the first `at` bytes into a new buffer; `self` keeps the rest.
    ///
    /// # Panics
    /// If `at > self.len()` (a caller bug, never input-driven).
    pub fn split_to(&mut self, at: usize) -> IoBuf {
        assert!(at <= self.len, "split_to out of bounds");
        let head = IoBuf {
            alloc: Arc::clone(&self.alloc),
            off: self.off,
            len: at,
        };
        self.off += at;
        self.len -= at;
        head
    }

    /// Appends `tail` to `self`. When `tail` is the neighbouring window of the
    /// same allocation this is O(1); otherwise the bytes are copied into a
    /// fresh allocation.
    pub fn unsplit(&mut self, tail: IoBuf) {
        if Arc::ptr_eq(&self.alloc, &tail.alloc) && self.off + self.len == tail.off {
            self.len += tail.len;
            return;
        }
        let mut joined = IoBuf::for_read(self.len + tail.len);
        joined[..self.len].copy_from_slice(self);
        joined[self.len..].copy_from_slice(&tail);
        *self = joined;
    }

    /// Shortens the window to `len` bytes (no-op when already shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the window [off, off+len) lies inside the allocation, which
        // lives as long as `self.alloc`; no other `IoBuf` covers these bytes
        // (windows are only created by splitting), so no `&mut` aliases them.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        // SAFETY: as in `deref`, and `&mut self` makes this the only access to
        // the window.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

/// Whether every byte of `data` is zero; used by `detect-zeroes` and sparse
/// reads, so it works a word at a time.
pub fn is_zero(data: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words is valid for
        // any bit pattern; `align_to` handles the alignment split.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && body.chunks(8).all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let b = IoBuf::zeroed(5000);
        assert!(b.is_aligned(BUF_ALIGN));
        assert_eq!(b.len(), 5000);
        assert!(is_zero(&b));
    }

    #[test]
    fn split_and_unsplit_share_memory() {
        let mut b = IoBuf::filled(8192, 1);
        let mut head = b.split_to(4096);
        head.fill(2);
        assert_eq!(b.len(), 4096);
        assert!(b.is_aligned(4096));
        let p = head.as_ptr();
        head.unsplit(b);
        assert_eq!(head.as_ptr(), p);
        assert_eq!(head.len(), 8192);
        assert_eq!(head[0], 2);
        assert_eq!(head[4096], 1);
    }

    #[test]
    fn unsplit_foreign_copies() {
        let mut a = IoBuf::filled(3, 7);
        a.unsplit(IoBuf::filled(2, 9));
        assert_eq!(&a[..], &[7, 7, 7, 9, 9]);
    }

    #[test]
    fn recycled_buffers_are_zeroed_when_asked() {
        let len = POOL_MIN * 2;
        let p = {
            let b = IoBuf::filled(len, 0xa5);
            b.as_ptr()
        };
        // The pool hands the same memory back; `zeroed` must clear it.
        let z = IoBuf::zeroed(len);
        assert!(is_zero(&z));
        let q = z.as_ptr();
        drop(z);
        let r = IoBuf::for_read(len);
        assert_eq!(r.len(), len);
        assert!(r.is_aligned(BUF_ALIGN));
        assert_eq!(q, p);
        assert_eq!(r.as_ptr(), p);
    }

    #[test]
    fn pool_stays_bounded() {
        let bufs: Vec<IoBuf> = (0..(POOL_MAX_BYTES / (1 << 20) + 8))
            .map(|_| IoBuf::for_read(1 << 20))
            .collect();
        drop(bufs);
        POOL.with(|p| assert!(p.borrow().bytes <= POOL_MAX_BYTES));
    }

    #[test]
    fn large_buffers_are_huge_page_aligned_and_zeroed() {
        let mut b = IoBuf::zeroed(HUGE_PAGE + 4096);
        assert!(b.is_aligned(HUGE_PAGE));
        assert!(is_zero(&b));
        let head = b.split_to(HUGE_PAGE);
        assert!(b.is_aligned(BUF_ALIGN));
        drop(head);
        drop(b);
        // Recycled through the pool with the same layout, then released.
        let r = IoBuf::for_read(HUGE_PAGE + 4096);
        assert!(r.is_aligned(HUGE_PAGE));
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[1] = 1;
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&[]));
    }
}
