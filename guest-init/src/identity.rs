//! Taking on the identity the host gives the sandbox ([`Identity`]), once
//! after a boot and again after every restore from a snapshot, where the
//! guest still has the identity of the guest the snapshot was taken from:
//! its random pool, its clock, its hostname and the CA it trusts.

use std::os::fd::AsRawFd;
use std::path::Path;

use guest_protocol::agent::Identity;

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`): mix bytes into the input
/// pool and credit them as entropy.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`): reseed the kernel's CRNG from the
/// input pool now, rather than at its next scheduled reseed.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
/// Most entropy bytes taken in one identity.
const MAX_ENTROPY: usize = 4096;

/// Apply `identity`: reseed first (nothing random may come from the old
/// state once the host has handed the sandbox out), then the clock, the
/// hostname and the CA.
pub(crate) fn apply(identity: &Identity) -> Result<(), String> {
    reseed(&identity.entropy)?;
    set_clock(identity.time)?;
    if let Some(name) = &identity.hostname {
        nix::unistd::sethostname(name).map_err(|e| format!("set the hostname: {e}"))?;
        crate::replace_file("/etc/hostname", format!("{name}\n").as_bytes())
            .map_err(|e| format!("write /etc/hostname: {e}"))?;
    }
    crate::trust::install_ca(Path::new("/"), &identity.ca_pem).map(drop)
}

/// The `struct rand_pool_info` that `RNDADDENTROPY` takes: the entropy
/// credited (in bits), the buffer's size (in bytes), the buffer.
fn pool_info(entropy: &[u8]) -> Result<Vec<u8>, String> {
    if entropy.len() < 32 || entropy.len() > MAX_ENTROPY {
        return Err(format!("{} entropy bytes: expected 32 to {MAX_ENTROPY}", entropy.len()));
    }
    let bytes = i32::try_from(entropy.len()).map_err(|e| e.to_string())?;
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&(bytes * 8).to_ne_bytes());
    info.extend_from_slice(&bytes.to_ne_bytes());
    info.extend_from_slice(entropy);
    Ok(info)
}

fn reseed(entropy: &[u8]) -> Result<(), String> {
    let info = pool_info(entropy)?;
    let random =
        std::fs::OpenOptions::new().write(true).open("/dev/urandom").map_err(|e| format!("open /dev/urandom: {e}"))?;
    // SAFETY: `info` is a complete rand_pool_info (header and `buf_size`
    // bytes), alive for the call; the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(format!("add entropy: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(format!("reseed the CRNG: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn set_clock((secs, nanos): (i64, u32)) -> Result<(), String> {
    if nanos >= 1_000_000_000 || secs < 0 {
        return Err(format!("not a time: {secs}.{nanos:09}"));
    }
    let time = libc::timespec { tv_sec: secs, tv_nsec: libc::c_long::from(nanos) };
    // SAFETY: `time` is a valid timespec for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } < 0 {
        return Err(format!("set the clock: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_is_framed_as_the_kernel_reads_it() {
        let info = pool_info(&[0xab; 64]).unwrap();
        assert_eq!(&info[..4], &512i32.to_ne_bytes(), "credited bits");
        assert_eq!(&info[4..8], &64i32.to_ne_bytes(), "buffer size");
        assert_eq!(&info[8..], &[0xab; 64][..]);
        assert!(pool_info(&[1; 8]).is_err(), "too little entropy is refused");
        assert!(pool_info(&vec![1; MAX_ENTROPY + 1]).is_err());
    }

    #[test]
    fn a_time_out_of_range_is_refused_before_the_clock_is_touched() {
        assert!(set_clock((1, 1_000_000_000)).unwrap_err().contains("not a time"));
        assert!(set_clock((-5, 0)).unwrap_err().contains("not a time"));
    }
}
