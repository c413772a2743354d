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
