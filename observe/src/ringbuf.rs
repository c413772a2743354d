//! Draining the datapath's ring buffer: wait for readiness, then copy each
//! record out without allocating.

use std::{os::fd::AsRawFd, time::Duration};

use aya::maps::{MapData, RingBuf};
use weft_ebpf::abi::Event;

/// Reads verdict records from the kernel ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Blocks until records are available or `timeout` passes; true if readable.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        n > 0
    }

    /// Hands every available record to `f`; returns how many there were.
    /// Malformed (short) records are skipped and counted in the return's second value.
    pub fn drain(&mut self, mut f: impl FnMut(&Event)) -> (u64, u64) {
        let (mut ok, mut bad) = (0, 0);
        while let Some(item) = self.ring.next() {
            match Event::from_bytes(&item) {
                Some(ev) => {
                    ok += 1;
                    f(&ev)
                }
                None => bad += 1,
            }
        }
        (ok, bad)
    }
}
