//! Test builds only: the global allocator counts the bytes each thread has
//! allocated and not yet freed, so a test can say how much memory a
//! structure holds (what the agent keeps per object at scale) without
//! reading the process's RSS, which the allocator's free lists blur.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::atomic::{AtomicIsize, Ordering},
};

struct Counting;

thread_local! {
    /// Bytes this thread allocated minus the bytes it freed (with those of
    /// the threads it lent its count to: [`Account::lend`]).
    static LIVE: AtomicIsize = const { AtomicIsize::new(0) };
    /// The count this thread's allocations go to: its own (null) or that
    /// of the thread it works for.
    static COUNTS_FOR: Cell<*const AtomicIsize> = const { Cell::new(std::ptr::null()) };
}

/// Bytes the whole process holds, and the most it held since [`reset_peak`].
static PROCESS_LIVE: AtomicIsize = AtomicIsize::new(0);
static PROCESS_PEAK: AtomicIsize = AtomicIsize::new(0);
/// Allocations the whole process holds (each costs the allocator's own
/// header and rounding besides its bytes).
static PROCESS_BLOCKS: AtomicIsize = AtomicIsize::new(0);

fn count(delta: isize) {
    // try_with: the allocator also runs while the thread's locals are torn down.
    let lent = COUNTS_FOR.try_with(Cell::get).unwrap_or(std::ptr::null());
    if lent.is_null() {
        let _ = LIVE.try_with(|l| l.fetch_add(delta, Ordering::Relaxed));
    } else {
        // SAFETY: set by `Account::lend`, whose caller keeps the thread that
        // owns the count waiting until this thread stops counting on it.
        unsafe { (*lent).fetch_add(delta, Ordering::Relaxed) };
    }
    let now = PROCESS_LIVE.fetch_add(delta, Ordering::Relaxed).wrapping_add(delta);
    if delta > 0 {
        PROCESS_PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counting touches only a thread-local integer (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        PROCESS_BLOCKS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        PROCESS_BLOCKS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        PROCESS_BLOCKS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f` and returns its result with the bytes this thread allocated
/// during it and still holds afterwards (what the result, and whatever
/// `f` stored elsewhere, keep).
pub fn held_after<R>(f: impl FnOnce() -> R) -> (R, isize) {
    let before = thread_live();
    let r = f();
    (r, thread_live() - before)
}

/// The bytes this thread allocated and has not freed, from when it
/// started: two readings tell what was held at a point between them, which
/// [`held_after`] cannot (it reads at the end of its closure alone).
pub fn thread_live() -> isize {
    LIVE.with(|l| l.load(Ordering::Relaxed))
}

/// The count of the calling thread, for threads that work for it while it
/// waits (scoped threads): what they allocate and keep is what it holds.
#[derive(Clone, Copy)]
pub struct Account(*const AtomicIsize);

// SAFETY: only handed to scoped threads the owning thread waits for.
unsafe impl Send for Account {}

impl Account {
    pub fn of_this_thread() -> Self {
        Account(LIVE.with(|l| l as *const AtomicIsize))
    }

    /// Runs `f` on this thread with its allocations counted on the account.
    /// The account's thread must outlive the call (it waits for this one).
    pub fn lend<R>(self, f: impl FnOnce() -> R) -> R {
        let before = COUNTS_FOR.with(|c| c.replace(self.0));
        let r = f();
        COUNTS_FOR.with(|c| c.set(before));
        r
    }
}

/// The bytes every thread of the process holds now.
pub fn process_live() -> isize {
    PROCESS_LIVE.load(Ordering::Relaxed)
}

/// The allocations every thread of the process holds now.
pub fn process_blocks() -> isize {
    PROCESS_BLOCKS.load(Ordering::Relaxed)
}

/// The most bytes the process held at once since the last call (or since
/// it started), and starts counting again from what it holds now.
pub fn take_peak() -> isize {
    PROCESS_PEAK.swap(process_live(), Ordering::Relaxed)
}
