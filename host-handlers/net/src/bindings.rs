//! The addresses a sandbox got from its DNS handler, by address: a TCP
//! connection to one of them is decided as a connection to the name it was
//! the answer for (`tcp.connect.host`). An address the sandbox never got from
//! an allowed, answered query has no name, and only a rule naming
//! `tcp.connect.ip` can allow a connection to it.
//!
//! Guest programs keep addresses longer than the TTL says (resolver caches,
//! connection pools), so a binding lives at least [`MIN_LIFETIME`]. The table
//! holds at most [`MAX_BINDINGS`] addresses; beyond that the binding closest
//! to expiry goes first. When several names share an address (CDNs), the
//! latest answer names it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The shortest time an answered address keeps its name.
pub const MIN_LIFETIME: Duration = Duration::from_secs(600);
/// The most addresses one sandbox's table holds.
pub const MAX_BINDINGS: usize = 4096;

#[derive(Debug)]
struct Binding {
    name: String,
    expires: Instant,
}

/// Name by address, for one sandbox.
#[derive(Debug, Default)]
pub struct Bindings {
    table: Mutex<HashMap<IpAddr, Binding>>,
}

impl Bindings {
    /// Record that `name` was answered with `addresses`, valid for `ttl`.
    pub fn bind(&self, name: &str, addresses: impl IntoIterator<Item = IpAddr>, ttl: Duration) {
        let expires = Instant::now() + ttl.max(MIN_LIFETIME);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        for ip in addresses {
            if table.len() >= MAX_BINDINGS && !table.contains_key(&ip) {
                let now = Instant::now();
                table.retain(|_, binding| binding.expires > now);
                if table.len() >= MAX_BINDINGS {
                    if let Some(oldest) = table.iter().min_by_key(|(_, b)| b.expires).map(|(ip, _)| *ip) {
                        table.remove(&oldest);
                    }
                }
            }
            table.insert(ip.to_canonical(), Binding { name: name.to_owned(), expires });
        }
    }

    /// The name `ip` was last answered for, if that answer is still valid.
    pub fn name_of(&self, ip: IpAddr) -> Option<String> {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.get(&ip.to_canonical()).filter(|b| b.expires > Instant::now()).map(|b| b.name.clone())
    }

    /// How many addresses are bound (expired ones included until evicted).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn latest_answer_names_an_address() {
        let bindings = Bindings::default();
        assert_eq!(bindings.name_of(ip("93.184.216.34")), None);
        bindings.bind("a.example", [ip("93.184.216.34"), ip("2001:db8::1")], Duration::from_secs(1));
        assert_eq!(bindings.name_of(ip("93.184.216.34")).as_deref(), Some("a.example"));
        assert_eq!(bindings.name_of(ip("::ffff:93.184.216.34")).as_deref(), Some("a.example"));
        assert_eq!(bindings.name_of(ip("2001:db8::1")).as_deref(), Some("a.example"));
        bindings.bind("b.example", [ip("93.184.216.34")], Duration::ZERO);
        assert_eq!(bindings.name_of(ip("93.184.216.34")).as_deref(), Some("b.example"));
    }

    #[test]
    fn table_is_bounded() {
        let bindings = Bindings::default();
        for n in 0..(MAX_BINDINGS as u32 + 100) {
            bindings.bind("flood.example", [IpAddr::from(n.to_be_bytes())], Duration::from_secs(u64::from(n)));
        }
        assert_eq!(bindings.len(), MAX_BINDINGS);
        let newest = IpAddr::from((MAX_BINDINGS as u32 + 99).to_be_bytes());
        assert_eq!(bindings.name_of(newest).as_deref(), Some("flood.example"));
    }
}
