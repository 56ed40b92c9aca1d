//! The guest's network, built at boot over netlink (no `ip` or `nft` binary
//! needs to be in the image).
//!
//! The guest has no network device, only vsock. Programs still expect a normal
//! IPv4 stack, so init builds one whose every way out leads to a local proxy:
//!
//! - `lo` up;
//! - `dummy0` with 10.0.0.1/24, up, and the default route through it, so that
//!   connect() to any address finds a route (without one it fails before
//!   netfilter ever sees the packet);
//! - an nftables `ip sandbox` table with a nat OUTPUT chain:
//!   udp and tcp port 53 are redirected to 127.0.0.1:[`DNS_PROXY_PORT`]
//!   (dns-proxy); tcp port 443, and any other TCP leaving through dummy0, to
//!   127.0.0.1:[`NET_PROXY_PORT`] (net-proxy), which hands each connection to the host with its original
//!   destination for a `tcp.connect` decision; any other UDP leaving through
//!   dummy0 is redirected to port 0 of 127.0.0.1, where nothing can listen,
//!   so it is refused at once (ICMP port unreachable) instead of vanishing
//!   into dummy0 until the client times out.
//!
//! `redirect` (the `redir` expression) rather than `dnat to 127.0.0.1`: in nat
//! OUTPUT it rewrites the destination to 127.0.0.1 the same way, needs no
//! address register, and works without `route_localnet`.
//!
//! The links, address and route, and then the nft rules, each reach the
//! kernel as one batch of netlink messages in one sendmsg on a plain
//! netlink socket, every message acknowledged: rtnetlink messages built
//! with rtnetlink's message builders, and an nfnetlink batch built with
//! netlink-packet-netfilter's message types (an nft batch must arrive in
//! one sendmsg; rustables would add a libclang build dependency for what
//! are five rules). No async runtime: where guest kernel code is emulated,
//! starting one and its connection task cost the boot about a third of a
//! second.
//!
//! This is a convenience for programs in the guest, not a security boundary:
//! guest root can undo all of it, and the host decides what leaves.

use std::ffi::CString;
use std::fmt::Display;
use std::net::Ipv4Addr;

use guest_protocol::ports::{DNS_PROXY_PORT, NET_PROXY_PORT};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook, HookNumber, Immediate,
    InetHookNumber, ListAttribute, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register, RuleAttribute,
    RuleMessage, TableAttribute, TableMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use rtnetlink::packet_core::{
    DefaultNla, NetlinkDeserializable, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_APPEND,
    NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, protocols::NETLINK_ROUTE, Socket, SocketAddr};
use rtnetlink::{AddressMessageBuilder, LinkUnspec, RouteMessageBuilder};

/// The link every non-local route leads to. The kernel's built-in dummy
/// driver (CONFIG_DUMMY=y, `numdummies` defaulting to 1) creates it at boot,
/// so it is configured, not created; booting with `dummy.numdummies=0` makes
/// the setup fail at the step that looks it up.
pub const UPLINK: &str = "dummy0";
/// The guest's address on [`UPLINK`].
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Prefix length of [`GUEST_ADDRESS`].
pub const GUEST_PREFIX_LEN: u8 = 24;

/// The nft table init creates (family ip: the guest kernel has no IPv6).
const TABLE: &str = "sandbox";
const CHAIN: &str = "output";
/// NF_IP_PRI_NAT_DST: where nat OUTPUT chains hook.
const NAT_OUTPUT_PRIORITY: i32 = -100;
const NF_ACCEPT: u32 = 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
/// Port 0 of 127.0.0.1: no socket can listen there.
const REFUSED_PORT: u16 = 0;

/// A network setup step that failed, and why.
#[derive(Debug, thiserror::Error)]
#[error("network setup: {step}: {cause}")]
pub struct NetworkError {
    step: String,
    cause: String,
}

impl NetworkError {
    fn new(step: impl Into<String>, cause: impl Display) -> Self {
        Self { step: step.into(), cause: cause.to_string() }
    }
}

/// Build the guest network (see the module docs). Any failure is fatal for
/// the boot: a half-built network must not run the user's command.
pub fn setup() -> Result<(), NetworkError> {
    setup_with_uplink(UPLINK)
}

/// `/etc/resolv.conf` for the guest. Any address would do (port 53 anywhere
/// is redirected); the guest's own address always has a route.
pub fn resolv_conf() -> String {
    format!("nameserver {GUEST_ADDRESS}\n")
}

/// [`setup`] with another link in place of dummy0 (tests use a veth, as the
/// host kernel has no dummy driver).
fn setup_with_uplink(uplink: &str) -> Result<(), NetworkError> {
    let uplink_index = configure_links(uplink)?;
    install_nat_rules(uplink_index)
}

/// lo up; the uplink with its address, up; the default route through it.
fn configure_links(uplink: &str) -> Result<u32, NetworkError> {
    let index = link_index(uplink).map_err(|e| NetworkError::new(format!("find {uplink}"), e))?;
    let address =
        AddressMessageBuilder::<Ipv4Addr>::new().index(index).address(GUEST_ADDRESS, GUEST_PREFIX_LEN).build();
    let default_route = RouteMessageBuilder::<Ipv4Addr>::new().output_interface(index).scope(RouteScope::Link).build();
    let create = NLM_F_CREATE | NLM_F_EXCL;
    // In this order: the kernel adds a route through a link that is up only.
    let requests = [
        ("bring lo up".to_string(), RouteNetlinkMessage::SetLink(LinkUnspec::new_with_name("lo").up().build()), 0),
        (
            format!("add {GUEST_ADDRESS}/{GUEST_PREFIX_LEN} to {uplink}"),
            RouteNetlinkMessage::NewAddress(address),
            create,
        ),
        (format!("bring {uplink} up"), RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(index).up().build()), 0),
        (format!("add the default route via {uplink}"), RouteNetlinkMessage::NewRoute(default_route), create),
    ];
    let mut batch = Vec::new();
    let mut steps = Vec::with_capacity(requests.len());
    for (step, message, flags) in requests {
        steps.push(step);
        append_message(&mut batch, message, NLM_F_ACK | flags, steps.len() as u32);
    }
    let mut socket = open_socket(NETLINK_ROUTE, "open a route netlink socket")?;
    send_acknowledged::<RouteNetlinkMessage>(&mut socket, &batch, &steps, "configure the links")?;
    Ok(index)
}

/// A netlink socket of `protocol`, connected to the kernel.
fn open_socket(protocol: isize, step: &str) -> Result<Socket, NetworkError> {
    let mut socket = Socket::new(protocol).map_err(|e| NetworkError::new(step, e))?;
    socket.bind_auto().map_err(|e| NetworkError::new(step, e))?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(|e| NetworkError::new(step, e))?;
    Ok(socket)
}

fn link_index(name: &str) -> std::io::Result<u32> {
    let c_name = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call,
    // which only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(index)
}

/// The nat table, chain and rules, as (step name, message, extra flags).
fn nat_ruleset(uplink_index: u32) -> Vec<(String, NfTablesMessage, u16)> {
    let table = NfTablesMessage::NewTable(TableMessage { attributes: vec![TableAttribute::Name(TABLE.into())] });
    let chain = NfTablesMessage::NewChain(ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.into()),
            ChainAttribute::Name(CHAIN.into()),
            ChainAttribute::Type("nat".into()),
            ChainAttribute::Hook(vec![
                Hook::Number(HookNumber::Inet(InetHookNumber::LocalOut)),
                // The kernel reads the priority as a big-endian s32.
                Hook::Priority(NAT_OUTPUT_PRIORITY as u32),
            ]),
            ChainAttribute::Policy(NF_ACCEPT),
        ],
    });
    let rule = |matches: Vec<ListAttribute<ExpressionAttribute>>, port: u16| {
        let mut expressions = matches;
        expressions.push(
            Expressions::Immediate(vec![
                Immediate::DestinationRegister(Register::Reg1),
                Immediate::Data(DataAttribute::Value(port.to_be_bytes().to_vec())),
            ])
            .into(),
        );
        expressions.push(
            Expressions::Other {
                expression_type: "redir".into(),
                attributes: vec![DefaultNla::new(NFTA_REDIR_REG_PROTO_MIN, 1u32.to_be_bytes().to_vec())],
            }
            .into(),
        );
        NfTablesMessage::NewRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(TABLE.into()),
                RuleAttribute::Chain(CHAIN.into()),
                RuleAttribute::Expressions(expressions),
            ],
        })
    };
    let (tcp, udp) = (libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8);
    let append = NLM_F_CREATE | NLM_F_APPEND;
    vec![
        (format!("create nft table ip {TABLE}"), table, NLM_F_CREATE),
        (format!("create nat OUTPUT chain {CHAIN}"), chain, NLM_F_CREATE),
        (
            format!("redirect udp port 53 to {DNS_PROXY_PORT}"),
            rule([l4proto(udp), dport(53)].concat(), DNS_PROXY_PORT),
            append,
        ),
        (
            format!("redirect tcp port 53 to {DNS_PROXY_PORT}"),
            rule([l4proto(tcp), dport(53)].concat(), DNS_PROXY_PORT),
            append,
        ),
        (
            format!("redirect tcp port 443 to {NET_PROXY_PORT}"),
            rule([l4proto(tcp), dport(443)].concat(), NET_PROXY_PORT),
            append,
        ),
        (
            format!("redirect other tcp to {NET_PROXY_PORT}"),
            rule([oif(uplink_index), l4proto(tcp)].concat(), NET_PROXY_PORT),
            append,
        ),
        ("refuse other udp".into(), rule([oif(uplink_index), l4proto(udp)].concat(), REFUSED_PORT), append),
    ]
}

/// Run `load` (which fills register 1) and compare register 1 with `value`.
fn load_and_compare(load: Expressions, value: Vec<u8>) -> Vec<ListAttribute<ExpressionAttribute>> {
    vec![
        load.into(),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(value)),
        ])
        .into(),
    ]
}

/// `meta l4proto <proto>`
fn l4proto(proto: u8) -> Vec<ListAttribute<ExpressionAttribute>> {
    load_and_compare(
        Expressions::Meta(vec![Meta::Key(MetaKey::L4Proto), Meta::DestinationRegister(Register::Reg1)]),
        vec![proto],
    )
}

/// `meta oif <index>` (an interface index is compared in host byte order)
fn oif(index: u32) -> Vec<ListAttribute<ExpressionAttribute>> {
    load_and_compare(
        Expressions::Meta(vec![Meta::Key(MetaKey::Oif), Meta::DestinationRegister(Register::Reg1)]),
        index.to_ne_bytes().to_vec(),
    )
}

/// `th dport <port>` (after an l4proto match on tcp or udp)
fn dport(port: u16) -> Vec<ListAttribute<ExpressionAttribute>> {
    load_and_compare(
        Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(NFT_PAYLOAD_TRANSPORT_HEADER),
            Payload::Offset(2),
            Payload::Len(2),
        ]),
        port.to_be_bytes().to_vec(),
    )
}

/// Send the ruleset as one nfnetlink batch (applied atomically) and check the
/// kernel's acknowledgement of every message in it.
fn install_nat_rules(uplink_index: u32) -> Result<(), NetworkError> {
    let ruleset = nat_ruleset(uplink_index);
    let mut socket = open_socket(NETLINK_NETFILTER, "open a netfilter netlink socket")?;

    let control = |message| {
        let header = NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES);
        NetfilterMessage::new(header, message)
    };
    let mut batch = Vec::new();
    let mut steps = Vec::with_capacity(ruleset.len());
    append_message(&mut batch, control(ControlMessage::BatchBegin), 0, 0);
    for (step, message, flags) in ruleset {
        steps.push(step);
        let ip = NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0);
        append_message(&mut batch, NetfilterMessage::new(ip, message), NLM_F_ACK | flags, steps.len() as u32);
    }
    append_message(&mut batch, control(ControlMessage::BatchEnd), 0, steps.len() as u32 + 1);

    send_acknowledged::<NetfilterMessage>(&mut socket, &batch, &steps, "send the nft ruleset")
}

/// Send `batch` in one sendmsg and check the kernel's acknowledgement of
/// each of `steps` (message `i` of them has sequence number `i + 1`); a
/// refused one fails naming its step, anything else naming `what`.
fn send_acknowledged<T: NetlinkDeserializable>(
    socket: &mut Socket,
    batch: &[u8],
    steps: &[String],
    what: &str,
) -> Result<(), NetworkError> {
    socket.send(batch, 0).map_err(|e| NetworkError::new(what, e))?;
    // The kernel handles the messages inside sendmsg: every acknowledgement
    // is queued by now, so nothing here waits.
    let mut acknowledged = 0;
    let mut buf = Vec::with_capacity(64 * 1024);
    while acknowledged < steps.len() {
        buf.clear();
        socket
            .recv(&mut buf, libc::MSG_DONTWAIT)
            .map_err(|e| NetworkError::new(what, format!("{acknowledged} of {} acknowledged: {e}", steps.len())))?;
        let mut offset = 0;
        while offset < buf.len() {
            let reply = NetlinkMessage::<T>::deserialize(&buf[offset..])
                .map_err(|e| NetworkError::new(what, format!("unreadable reply: {e}")))?;
            let length = reply.header.length as usize;
            if let NetlinkPayload::Error(error) = reply.payload {
                let step = (reply.header.sequence_number as usize)
                    .checked_sub(1)
                    .and_then(|i| steps.get(i))
                    .map_or(what, String::as_str);
                if error.code.is_some() {
                    return Err(NetworkError::new(step, error.to_io()));
                }
                acknowledged += 1;
            }
            if length == 0 {
                break;
            }
            offset += length.next_multiple_of(4);
        }
    }
    Ok(())
}

fn append_message<T: NetlinkSerializable>(batch: &mut Vec<u8>, message: T, flags: u16, seq: u32)
where
    NetlinkMessage<T>: From<T>,
{
    let mut message = NetlinkMessage::from(message);
    message.header.flags = NLM_F_REQUEST | flags;
    message.header.sequence_number = seq;
    message.finalize();
    let start = batch.len();
    batch.resize(start + message.buffer_len(), 0);
    message.serialize(&mut batch[start..]);
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr as IpSocketAddr;
    use std::time::Duration;

    use guest_protocol::ports::{DNS_PORT, MITM_PORT};
    use guest_protocol::sandbox_dir::SandboxDir;
    use guest_proxies::upstream::Upstream;
    use guest_proxies::{dns, net};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener};

    use super::*;

    /// An address outside the guest (TEST-NET-3). Traffic to it never leaves
    /// the test's own network namespace, which has no way out.
    const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

    /// Run `f` on a thread of its own inside a new, empty network namespace.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's namespace membership.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// A veth pair standing in for dummy0 (no dummy driver on the host).
    fn add_veth(name: &str, peer: &str) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        rt.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(connection);
            handle.link().add(rtnetlink::LinkVeth::new(name, peer).build()).execute().await.unwrap();
            handle.link().set(LinkUnspec::new_with_name(peer).up().build()).execute().await.unwrap();
        });
    }

    #[test]
    fn missing_uplink_fails_naming_the_step() {
        let err = in_new_netns(|| setup_with_uplink("nosuchlink0")).unwrap_err();
        assert!(err.to_string().contains("find nosuchlink0"), "{err}");
    }

    #[test]
    fn a_refused_request_fails_naming_its_step() {
        let err = in_new_netns(|| {
            add_veth("uplink0", "peer0");
            setup_with_uplink("uplink0").unwrap();
            setup_with_uplink("uplink0").unwrap_err()
        });
        assert!(err.to_string().contains(&format!("add {GUEST_ADDRESS}/{GUEST_PREFIX_LEN} to uplink0")), "{err}");
    }

    #[test]
    fn resolv_conf_names_an_address_with_a_route() {
        assert_eq!(resolv_conf().trim(), format!("nameserver {GUEST_ADDRESS}"));
    }

    /// The whole data path in one namespace: the network built by
    /// `setup_with_uplink`, the real proxies on their ports, fake host
    /// handlers on Unix sockets.
    #[test]
    fn traffic_reaches_the_proxies_or_is_refused() {
        in_new_netns(|| {
            add_veth("uplink0", "peer0");
            setup_with_uplink("uplink0").unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(check_data_path());
        });
    }

    async fn check_data_path() {
        let dir = tempfile::tempdir().unwrap();
        let host = SandboxDir::new(dir.path());
        let (dns_host, mitm_host) = (host.vsock_port_socket(DNS_PORT), host.vsock_port_socket(MITM_PORT));
        tokio::spawn(echo_dns_host(UnixListener::bind(&dns_host).unwrap()));
        tokio::spawn(header_echo_host(UnixListener::bind(&mitm_host).unwrap()));
        let dns_addr = IpSocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PROXY_PORT));
        let udp = UdpSocket::bind(dns_addr).await.unwrap();
        let tcp = TcpListener::bind(dns_addr).await.unwrap();
        tokio::spawn(dns::serve(udp, tcp, Upstream::Unix(dns_host), Duration::from_secs(2)));
        let net_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, NET_PROXY_PORT)).await.unwrap();
        tokio::spawn(net::serve(net_listener, Upstream::Unix(mitm_host)));

        // The address is on the uplink, and the default route leads there.
        UdpSocket::bind((GUEST_ADDRESS, 0)).await.unwrap();
        let probe = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.unwrap();
        probe.connect((ELSEWHERE, 9)).await.unwrap();
        assert_eq!(probe.local_addr().unwrap().ip(), GUEST_ADDRESS);

        // DNS to port 53 anywhere, over UDP and TCP, reaches the host.
        for server in [GUEST_ADDRESS, ELSEWHERE] {
            let client = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.unwrap();
            client.connect((server, 53)).await.unwrap();
            let query = dns_query(0x5150);
            client.send(&query).await.unwrap();
            let mut buf = [0; 512];
            let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
            assert_answer(&query, &buf[..len]);
        }
        let mut stream = TcpStream::connect((ELSEWHERE, 53)).await.unwrap();
        let query = dns_query(0x6160);
        stream.write_u16(query.len() as u16).await.unwrap();
        stream.write_all(&query).await.unwrap();
        let len = stream.read_u16().await.unwrap();
        let mut answer = vec![0; usize::from(len)];
        stream.read_exact(&mut answer).await.unwrap();
        assert_answer(&query, &answer);

        // TCP to any port anywhere reaches the host, which learns the real
        // destination and decides.
        for port in [443, 80, 8443, 22] {
            let mut stream = TcpStream::connect((ELSEWHERE, port)).await.unwrap();
            let local = stream.local_addr().unwrap();
            let mut header = String::new();
            stream.read_to_string(&mut header).await.unwrap();
            assert_eq!(header, format!("PROXY TCP4 {} {ELSEWHERE} {} {port}\r\n", local.ip(), local.port()));
        }
        let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.unwrap();
        udp.connect((ELSEWHERE, 443)).await.unwrap();
        udp.send(b"quic?").await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(1), udp.recv(&mut [0; 16])).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    /// A DNS query for `example.test. A` with recursion desired.
    fn dns_query(id: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        q.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
        q
    }

    /// The fake host's answer: the query with QR set.
    fn assert_answer(query: &[u8], answer: &[u8]) {
        let mut expected = query.to_vec();
        expected[2] |= 0x80;
        assert_eq!(answer, expected);
    }

    /// Answers each framed query with itself, QR set.
    async fn echo_dns_host(listener: UnixListener) {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                while let Ok(len) = stream.read_u16().await {
                    let mut message = vec![0; usize::from(len)];
                    stream.read_exact(&mut message).await.unwrap();
                    message[2] |= 0x80;
                    stream.write_u16(len).await.unwrap();
                    stream.write_all(&message).await.unwrap();
                }
            });
        }
    }

    /// Sends each connection's PROXY header back, then closes it.
    async fn header_echo_host(listener: UnixListener) {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut header = String::new();
                stream.read_line(&mut header).await.unwrap();
                stream.get_mut().write_all(header.as_bytes()).await.unwrap();
            });
        }
    }
}
