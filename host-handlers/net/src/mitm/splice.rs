//! Connections carried without inspection: `tcp` (bytes as they are) and
//! `passthrough` (TLS left encrypted; its ClientHello must name the host the
//! address was resolved for).
//!
//! The upstream is always reached from the host's side: the name the sandbox
//! resolved the address from, resolved again on the host and every address
//! guarded; or, for an address without a name (allowed by a rule naming
//! `tcp.connect.ip`), that address, guarded. The guest's bytes are counted
//! both ways; each connection is one `net_events` row, written when it ends.

use std::sync::Arc;
use std::time::SystemTime;

use telemetry::Outcome;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::{timeout_at, Instant};

use super::exchange::Exchange;
use super::{Destination, MitmHandler, Setup, SetupFailure};
use crate::client_hello::peek_server_name;
use crate::dns::ADDRESS_GUARD_RULE;
use crate::error::Error;
use crate::idle::{Activity, Tracked};
use crate::upstream::UpstreamStream;

/// Rule recorded when a passthrough ClientHello names another host than the
/// one the address was resolved for.
pub const SNI_MISMATCH_RULE: &str = "builtin.passthrough_sni_mismatch";

type GuestIo = BufReader<Tracked<UnixStream>>;

/// The row of a spliced connection, before it has an outcome.
fn exchange(handler: &MitmHandler, started: SystemTime, destination: &Destination, sni: Option<String>) -> Exchange {
    let mut exchange = Exchange::new(handler.recorder.clone(), started, destination.label(), sni);
    destination.describe(&mut exchange.event);
    exchange.decide(Outcome::Allowed, destination.rule.clone());
    exchange
}

/// Whether the connection's row has a slot; if not, the connection is closed
/// without connecting upstream (its row is recorded best effort).
async fn reserved(exchange: &mut Exchange) -> bool {
    match exchange.reserve().await {
        Ok(()) => true,
        Err(err) => {
            exchange.fail(format!("not connected: {err}"));
            false
        }
    }
}

/// Connect to the destination from the host's side.
async fn connect(handler: &MitmHandler, destination: &Destination, exchange: &mut Exchange) -> Option<UpstreamStream> {
    let connected = if destination.host.is_empty() {
        handler.upstream.connect_address(destination.ip, destination.port).await
    } else {
        handler.upstream.connect_tcp(&destination.host, destination.port).await
    };
    match connected {
        Ok(stream) => Some(stream),
        Err(err @ Error::AddressRefused { .. }) => {
            exchange.decide(Outcome::Denied, Some(ADDRESS_GUARD_RULE.into()));
            exchange.event.error = Some(format!("upstream address refused: {err}"));
            None
        }
        Err(err) => {
            exchange.fail(format!("upstream {}:{}: {err}", destination.label(), destination.port));
            None
        }
    }
}

/// Copy both ways until both sides are done or nothing moves for the idle timeout.
async fn relay(
    handler: &MitmHandler,
    guest: GuestIo,
    mut upstream: UpstreamStream,
    exchange: &mut Exchange,
    activity: &Activity,
) {
    let mut guest = exchange.count_tunnel(guest);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut guest, &mut upstream) => {
            if let Err(err) = copied {
                exchange.event.error = Some(format!("relay: {err}"));
            }
        }
        _ = activity.expired(handler.idle_timeout) => {
            exchange.event.error = Some(format!("idle for {:?}", handler.idle_timeout));
        }
    }
}

/// `mode = "tcp"`: splice the bytes through.
pub(super) async fn tcp(
    handler: &Arc<MitmHandler>,
    started: SystemTime,
    guest: GuestIo,
    activity: Arc<Activity>,
    destination: Destination,
) {
    let mut exchange = exchange(handler, started, &destination, None);
    if !reserved(&mut exchange).await {
        return;
    }
    if let Some(upstream) = connect(handler, &destination, &mut exchange).await {
        relay(handler, guest, upstream, &mut exchange, &activity).await;
    }
}

/// `mode = "passthrough"`: read the ClientHello, require its SNI to be the
/// resolved name, pass the hello on and splice the rest.
pub(super) async fn passthrough(
    handler: &Arc<MitmHandler>,
    started: SystemTime,
    mut setup: Setup,
    mut guest: GuestIo,
    deadline: Instant,
    activity: Arc<Activity>,
    destination: Destination,
) {
    let (sni, hello) = match timeout_at(deadline, peek_server_name(&mut guest)).await {
        Ok(Ok(peeked)) => peeked,
        Ok(Err(err)) => return handler.record_setup(started, setup, SetupFailure::error(err)),
        Err(_) => {
            let error = format!("no TLS ClientHello within {:?}", handler.handshake_timeout);
            return handler.record_setup(started, setup, SetupFailure::error(error));
        }
    };
    setup.sni = sni.clone();
    if !destination.host.is_empty() && sni.as_deref() != Some(destination.host.as_str()) {
        let error = format!(
            "ClientHello names {} but the address was resolved for {}",
            sni.as_deref().unwrap_or("no server"),
            destination.host
        );
        let failure = SetupFailure { outcome: Outcome::Denied, rule: Some(SNI_MISMATCH_RULE.into()), error };
        return handler.record_setup(started, setup, failure);
    }
    let mut exchange = exchange(handler, started, &destination, sni);
    if !reserved(&mut exchange).await {
        return;
    }
    let Some(mut upstream) = connect(handler, &destination, &mut exchange).await else { return };
    if let Err(err) = upstream.write_all(&hello).await {
        exchange.fail(format!("send the ClientHello upstream: {err}"));
        return;
    }
    exchange.sent.count(hello.len());
    relay(handler, guest, upstream, &mut exchange, &activity).await;
}
