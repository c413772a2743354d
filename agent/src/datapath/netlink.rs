//! Route lookups over rtnetlink (one `RTM_GETROUTE` request), in the
//! current thread's network namespace: what `ip route get ADDR` answers,
//! without starting a process for every pod on every change.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
/// nlmsghdr, then rtmsg.
const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;

/// The device the node routes `ip` through (its name), or None when there
/// is no route (the kernel answers with an error, as `ip route get` fails).
pub fn route_device(ip: Ipv4Addr) -> io::Result<Option<String>> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; NLMSG_HDR + RTMSG + 8];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    req[NLMSG_HDR] = libc::AF_INET as u8;
    req[NLMSG_HDR + 1] = 32; // dst_len
    let attr = NLMSG_HDR + RTMSG;
    req[attr..attr + 2].copy_from_slice(&8u16.to_ne_bytes());
    req[attr + 2..attr + 4].copy_from_slice(&RTA_DST.to_ne_bytes());
    req[attr + 4..attr + 8].copy_from_slice(&ip.octets());
    // SAFETY: a zeroed sockaddr_nl addresses the kernel.
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: buffers and lengths are the arrays' own.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    // SAFETY: receives into the buffer, at most its length.
    let got = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let msg = &buf[..got as usize];
    match parse_reply(msg)? {
        Some(index) => Ok(interface_name(index)),
        None => Ok(None),
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// The output interface index of the kernel's answer; None when the kernel
/// says there is no route.
fn parse_reply(msg: &[u8]) -> io::Result<Option<u32>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed rtnetlink reply");
    let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
    let msg = msg.get(..len).ok_or_else(bad)?;
    match u16_at(msg, 4).ok_or_else(bad)? {
        NLMSG_ERROR => {
            let code = u32_at(msg, NLMSG_HDR).ok_or_else(bad)? as i32;
            // 0 would be an acknowledgement, which was not asked for.
            if code == 0 { Err(bad()) } else { Ok(None) }
        }
        RTM_NEWROUTE => {
            let mut at = NLMSG_HDR + RTMSG;
            while let (Some(alen), Some(atype)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
                let alen = usize::from(alen);
                if alen < 4 {
                    return Err(bad());
                }
                if atype == RTA_OIF && alen >= 8 {
                    return u32_at(msg, at + 4).map(Some).ok_or_else(bad);
                }
                at += alen.div_ceil(4) * 4;
            }
            Ok(None)
        }
        _ => Err(bad()),
    }
}

fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname needs.
    let p = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into the buffer.
    let c = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(c.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_address_is_routed_through_lo_as_ip_route_get_says() {
        assert_eq!(route_device(Ipv4Addr::LOCALHOST).unwrap().as_deref(), Some("lo"));
    }

    #[test]
    fn replies_are_read_within_their_bounds() {
        // An error reply (ENETUNREACH): no route.
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-101i32).to_ne_bytes());
        assert_eq!(parse_reply(&err).unwrap(), None);
        // A route with RTA_OIF 7 after another attribute.
        let mut r = vec![0u8; 44];
        r[0..4].copy_from_slice(&44u32.to_ne_bytes());
        r[4..6].copy_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        r[28..30].copy_from_slice(&8u16.to_ne_bytes());
        r[30..32].copy_from_slice(&RTA_DST.to_ne_bytes());
        r[36..38].copy_from_slice(&8u16.to_ne_bytes());
        r[38..40].copy_from_slice(&RTA_OIF.to_ne_bytes());
        r[40..44].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(parse_reply(&r).unwrap(), Some(7));
        // Lengths that point past the message are refused, not read.
        r[0..4].copy_from_slice(&400u32.to_ne_bytes());
        assert!(parse_reply(&r).is_err());
        r[0..4].copy_from_slice(&44u32.to_ne_bytes());
        r[36..38].copy_from_slice(&2u16.to_ne_bytes());
        assert!(parse_reply(&r).is_err());
        assert!(parse_reply(&[1, 2]).is_err());
    }
}
