//! Reports on the console every change to the guest's nftables rules after
//! boot. Guest root may change them (they are a convenience, not the
//! boundary: the host decides what leaves), but a flushed ruleset should not
//! go unnoticed in the sandbox's log.
//!
//! Init listens on the nftables netlink multicast group, which the kernel
//! notifies of every committed change, and logs one line per changed object.

use std::os::fd::AsRawFd;

use nix::sys::socket::{self, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};

/// The nftables notification group (NFNLGRP_NFTABLES).
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Netlink message header length.
const NLMSG_HDRLEN: usize = 16;

/// What an nftables message type (the low byte of the netlink type) changes.
pub(crate) fn describe(kind: u16) -> Option<&'static str> {
    if kind >> 8 != NFNL_SUBSYS_NFTABLES {
        return None;
    }
    Some(match kind & 0xff {
        0 => "table added",
        2 => "table deleted",
        3 => "chain added",
        5 => "chain deleted",
        6 => "rule added",
        8 => "rule deleted",
        9 => "set added",
        11 => "set deleted",
        _ => return None,
    })
}

/// The changes described by one datagram of netlink messages.
pub(crate) fn changes(datagram: &[u8]) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        out.extend(describe(kind));
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    out
}

/// Start watching, on a thread of its own; call after the boot's own rules are in.
pub(crate) fn watch() -> std::io::Result<()> {
    let fd =
        socket::socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkNetFilter)?;
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1 << (NFNLGRP_NFTABLES - 1)))?;
    std::thread::Builder::new().name("nft watch".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match socket::recv(fd.as_raw_fd(), &mut buf, socket::MsgFlags::empty()) {
                Ok(n) => {
                    for change in changes(&buf[..n]) {
                        crate::log(&format!(
                            "nftables changed after boot: {change} (the host still decides what leaves)"
                        ));
                    }
                }
                // ENOBUFS: notifications were lost; say so and go on.
                Err(nix::errno::Errno::ENOBUFS) => {
                    crate::log("nftables changed after boot (some notifications were lost)")
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    crate::log(&format!("nftables watch stopped: {e}"));
                    return;
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: usize) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.resize(m.len() + payload.next_multiple_of(4), 0);
        m
    }

    #[test]
    fn reads_every_change_in_a_datagram_and_ignores_the_rest() {
        let mut datagram = message(0x0a02, 13);
        datagram.extend(message(0x0a08, 4));
        datagram.extend(message(0x0a10, 0)); // NFT_MSG_NEWGEN: not a change of rules
        datagram.extend(message(0x0102, 0)); // another subsystem
        assert_eq!(changes(&datagram), ["table deleted", "rule deleted"]);
    }

    #[test]
    fn garbage_and_cut_messages_end_the_walk() {
        assert!(changes(&[]).is_empty());
        assert!(changes(&[0xff; 15]).is_empty());
        let mut cut = message(0x0a02, 8);
        cut.truncate(20);
        assert!(changes(&cut).is_empty());
        let mut zero = message(0x0a02, 0);
        zero[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert!(changes(&zero).is_empty());
    }
}
