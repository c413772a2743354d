//! Draining the datapath's ring buffer: wait for readiness, then copy each
//! record out without allocating. Also a raw record as one line of text,
//! for `--print-events`.

use std::{os::fd::AsRawFd, time::Duration};

use aya::maps::{MapData, RingBuf};
use weft_ebpf::abi::{self, Event};
use weft_flow::names;

/// Reads verdict records from the kernel ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }
}

/// Where the pipeline's records come from: the kernel ring buffer, or
/// records a test writes.
pub trait Records {
    /// Blocks until records are available or `timeout` passes; true if readable.
    fn wait(&self, timeout: Duration) -> bool;

    /// Hands every available record to `f`. Returns how many were records
    /// and how many were malformed (too short: skipped).
    fn drain(&mut self, f: impl FnMut(&Event)) -> (u64, u64);
}

/// Decodes one raw record for `f`; false (and `f` not called) when it is
/// too short to be one.
pub fn decode(raw: &[u8], f: &mut impl FnMut(&Event)) -> bool {
    match Event::from_bytes(raw) {
        Some(ev) => {
            f(&ev);
            true
        }
        None => false,
    }
}

impl Records for EventReader {
    fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n > 0
    }

    fn drain(&mut self, mut f: impl FnMut(&Event)) -> (u64, u64) {
        let (mut ok, mut bad) = (0u64, 0u64);
        while let Some(item) = self.ring.next() {
            if decode(&item, &mut f) {
                ok = ok.saturating_add(1);
            } else {
                bad = bad.saturating_add(1);
            }
        }
        (ok, bad)
    }
}

/// One line per record, for `--print-events` and debugging.
pub fn event_line(ev: &abi::Event) -> String {
    let flags = if ev.proto == 6 { format!(" Flags: {}", names::tcp_flags(ev.tcp_flags)) } else { String::new() };
    let ids = format!("(ID:{}) -> (ID:{})", ev.src_identity, ev.dst_identity);
    let xlate = if ev.flags as u32 & abi::EVF_XLATED_DST != 0 {
        format!(" [orig dst {}]", ev.orig())
    } else if ev.flags as u32 & abi::EVF_REVNAT != 0 {
        format!(" [orig src {}]", ev.orig())
    } else {
        String::new()
    };
    let what = match ev.r#type as u32 {
        abi::EV_DROP => format!("DROPPED ({})", names::drop_reason(ev.subtype as u32)),
        abi::EV_POLICY => format!(
            "policy-verdict:{} {}",
            if ev.subtype as u32 == abi::POLICY_ALLOW { "ALLOWED" } else { "DENIED" },
            if ev.direction as u32 == abi::DIR_INGRESS { "INGRESS" } else { "EGRESS" }
        ),
        abi::EV_SOCK => {
            format!("sock {} ({})", names::observation_point(ev.subtype as u32), names::trace_reason(ev.reason as u32))
        }
        _ => format!(
            "{} FORWARDED ({})",
            names::observation_point(ev.subtype as u32),
            names::trace_reason(ev.reason as u32)
        ),
    };
    format!("{} -> {} {ids} {what} {}{flags}{xlate}", ev.src(), ev.dst(), names::protocol(ev.proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI names the datapath's numbers without linking it
    /// (`weft_flow::names`): they must be the ones the ABI uses.
    #[test]
    fn the_abi_numbers_are_the_ones_names_knows() {
        for (obs, name) in [
            (abi::OBS_TO_ENDPOINT, "to-endpoint"),
            (abi::OBS_TO_PROXY, "to-proxy"),
            (abi::OBS_TO_HOST, "to-host"),
            (abi::OBS_TO_STACK, "to-stack"),
            (abi::OBS_FROM_ENDPOINT, "from-endpoint"),
            (abi::OBS_FROM_PROXY, "from-proxy"),
            (abi::OBS_FROM_HOST, "from-host"),
            (abi::OBS_FROM_STACK, "from-stack"),
            (abi::OBS_FROM_NETWORK, "from-network"),
            (abi::OBS_TO_NETWORK, "to-network"),
        ] {
            assert_eq!(names::observation_point(obs), name);
        }
        for (reason, name) in [
            (abi::REASON_NEW, "new"),
            (abi::REASON_ESTABLISHED, "established"),
            (abi::REASON_REPLY, "reply"),
            (abi::REASON_RELATED, "related"),
        ] {
            assert_eq!(names::trace_reason(reason), name);
        }
    }
}
