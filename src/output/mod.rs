//! Sessions to lines: the JSON and text layouts, the diagnosis sentence, the log filter.
//! Pure formatting; the thread that writes the lines is in `writer`, where they go in `sink`.

mod dns_json;
pub mod json;
pub mod lines;
pub mod lookup;
pub mod policy;
pub mod sink;
pub mod stats;
mod text;
pub mod writer;

pub use policy::{LineOptions, LinePolicy, Messages, SampleRate};
pub use sink::{Flow, Sink, WriteSink};

use crate::correlate::{Message, MessageStore, Session, Status};
use crate::diagnosis::Diagnosis;
use crate::dns::{class_name, rcode_name, rtype_name};
use crate::dnstap::{self, DnstapMessage, Nanos, Role, SourceRegistry};
use domain::base::iana::{Class, Rtype};
use json::Json;
use std::ops::Range;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

/// Which statuses `--log` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFilter {
    pub succeeded: bool,
    pub failed: bool,
    pub sample_loss: bool,
}

impl LogFilter {
    pub const ALL: LogFilter = LogFilter {
        succeeded: true,
        failed: true,
        sample_loss: true,
    };

    /// Parses `all`, `failed`, `sampleloss` or a comma list of them.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut f = LogFilter {
            succeeded: false,
            failed: false,
            sample_loss: false,
        };
        for part in s.split(',').map(str::trim) {
            match part.to_ascii_lowercase().as_str() {
                "all" => f = Self::ALL,
                "failed" => f.failed = true,
                "sampleloss" => f.sample_loss = true,
                "succeeded" => f.succeeded = true,
                other => {
                    return Err(format!(
                        "unknown --log value {other:?}: use all, failed, sampleloss or succeeded"
                    ))
                }
            }
        }
        Ok(f)
    }

    pub fn allows(self, status: Status) -> bool {
        match status {
            Status::Succeeded => self.succeeded,
            Status::Failed => self.failed,
            Status::SampleLoss => self.sample_loss,
        }
    }
}

/// A message of the session, decoded again from its frame for rendering.
struct Decoded<'a> {
    role: Role,
    /// `correlate::Message` flags.
    flags: u8,
    /// The stored bytes that did not decode keep their place in `messages`, as hex.
    msg: Result<DnstapMessage<'a>, Undecodable<'a>>,
}

struct Undecodable<'a> {
    error: dnstap::DecodeError,
    bytes: &'a [u8],
}

impl Decoded<'_> {
    fn msg(&self) -> Option<&DnstapMessage<'_>> {
        self.msg.as_ref().ok()
    }

    fn wire(&self) -> Option<&[u8]> {
        let m = self.msg()?;
        if self.role.is_response() {
            m.response_message.as_deref()
        } else {
            m.query_message.as_deref()
        }
    }

    /// A time rejected at ingest (`Message::TIME_REJECTED`) is no time for computations.
    fn response_time(&self) -> Option<Nanos> {
        let m = self
            .msg()
            .filter(|_| self.flags & Message::TIME_REJECTED == 0)?;
        dnstap::time(m.response_time_sec, m.response_time_nsec)
    }

    fn query_time(&self) -> Option<Nanos> {
        let m = self
            .msg()
            .filter(|_| self.flags & Message::TIME_REJECTED == 0)?;
        dnstap::time(m.query_time_sec, m.query_time_nsec)
    }
}

pub struct Renderer {
    format: Format,
    sources: Arc<SourceRegistry>,
    options: LineOptions,
    /// The seconds the last line's times were in: the next line's are mostly the same.
    seconds: std::cell::Cell<json::Seconds>,
}

impl Renderer {
    pub fn new(format: Format, sources: Arc<SourceRegistry>) -> Self {
        Self {
            format,
            sources,
            options: LineOptions::default(),
            seconds: Default::default(),
        }
    }

    /// Lines that say their sample rate and carry the messages only where `options` wants.
    pub fn with_options(self, options: LineOptions) -> Self {
        Self { options, ..self }
    }

    /// Appends one line (with its newline) for the session to `out`: the facts and the
    /// sentence of its diagnosis `d`, and the stored messages decoded again if the line
    /// carries them.
    pub fn render(&self, s: &Session, d: &Diagnosis, store: &MessageStore, out: &mut Vec<u8>) {
        let v = &d.verdict;
        let with_messages = self.options.messages.rendered_for(v.status);
        // Only Succeeded lines are sampled; the others are all printed (rate 1).
        let sample_rate = (v.status == Status::Succeeded
            && !self.options.sample_succeeded.keeps_all())
        .then(|| self.options.sample_succeeded.rate());
        // Filled in place: the messages are a few hundred bytes each.
        let mut decoded = DecodedMessages::new();
        if with_messages {
            decode_messages(s, store, &mut decoded);
        }
        let decoded = with_messages.then_some(&decoded);
        let (identity, version) = self.sources.describe(s.source);
        match self.format {
            Format::Json => {
                let mut j = Json::with_seconds(out, self.seconds.get());
                j.begin_object();
                // Time first: log pipelines index it instead of the time they got the line.
                j.key("time");
                match d.time {
                    Some(t) => j.time(t),
                    None => j.null(),
                }
                // The schema's own names (kind, status, cause, sender...) are plain ASCII:
                // written without the check for bytes to escape.
                j.members(",\"kind\":\"session\"");
                j.field_name("status", v.status.name());
                j.field_uint("bitmap", v.bitmap.0 as u64);
                if let Some(rate) = sample_rate {
                    j.key("sample_rate");
                    j.float(rate);
                }
                j.field_name("cause", d.cause.name());
                j.key("diagnosis");
                j.string_with(|out| d.write_sentence(&identity, out, json::escape_into));
                j.field_str("identity", &identity);
                j.field_str("version", &version);
                write_summary_fields(&mut j, s, d);
                if let Some(decoded) = decoded {
                    j.key("messages");
                    write_messages(&mut j, decoded);
                }
                j.end_object();
                self.seconds.set(j.seconds());
            }
            Format::Text => {
                use std::io::Write;
                // Every string a sender controls goes through `text::escape_into`: one
                // physical line per session, whatever the identity or the name holds.
                out.extend_from_slice(b"Time: ");
                match d.time {
                    Some(t) => json::write_rfc3339(out, t),
                    None => out.push(b'-'),
                }
                let _ = write!(out, " Status: {} BitMap: {}", v.status.name(), v.bitmap.0);
                if let Some(rate) = sample_rate {
                    let _ = write!(out, " SampleRate: {rate}");
                }
                let _ = write!(out, " Cause: {}", d.cause.name());
                out.extend_from_slice(b" Identity: ");
                text::escape_into(out, &identity);
                let _ = write!(
                    out,
                    " Client: {} Question: ",
                    d.client.map_or("-".into(), |c| c.to_string())
                );
                text::escape_into(out, d.qname().unwrap_or("-"));
                let _ = write!(
                    out,
                    " {} {}",
                    d.qtype.map_or("-".into(), rtype_name),
                    d.qclass.map_or("-".into(), class_name),
                );
                if let Some(extra) = d.extra() {
                    out.extend_from_slice(b" Extra: ");
                    text::escape_into(out, &String::from_utf8_lossy(extra));
                    for (name, v) in [
                        (" Namespace: ", d.client_namespace()),
                        (" Pod: ", d.client_pod()),
                    ] {
                        out.extend_from_slice(name.as_bytes());
                        text::escape_into(out, v.unwrap_or("-"));
                    }
                }
                let _ = write!(
                    out,
                    " Rcode: {} Latency: {} Diagnosis: ",
                    d.rcode.map_or("-".into(), |r| rcode_name(r.into())),
                    d.latency
                        .map_or("-".into(), |l| format!("{:.3}ms", l as f64 / 1e6)),
                );
                d.write_sentence(&identity, out, text::escape_into);
                if let Some(loss) = v.loss {
                    let _ = write!(out, " LossReason: {}", loss.name());
                }
                if let Some(inc) = v.incomplete {
                    let missing: Vec<&str> = inc.missing.names().collect();
                    let _ = write!(
                        out,
                        " Incomplete: {} ({})",
                        missing.join(","),
                        inc.cause.name()
                    );
                }
                if let Some(decoded) = decoded {
                    out.extend_from_slice(b" Messages: ");
                    write_messages(&mut Json::new(out), decoded);
                }
            }
        }
        out.push(b'\n');
    }
}

/// A session's messages decoded again: the usual few without an allocation.
type DecodedMessages<'a> = smallvec::SmallVec<[Decoded<'a>; 4]>;

/// The session's messages decoded again from the store, for the line's `messages`.
fn decode_messages<'a>(s: &Session, store: &'a MessageStore, decoded: &mut DecodedMessages<'a>) {
    for m in &s.messages {
        let bytes = store.get(m.bytes);
        decoded.push(Decoded {
            role: m.role,
            flags: m.flags,
            msg: Ok(DnstapMessage::default()),
        });
        let last = decoded.len() - 1;
        let d = &mut decoded[last];
        if let Ok(msg) = &mut d.msg {
            if let Err(error) = dnstap::decode_message_into(bytes, msg) {
                d.msg = Err(Undecodable { error, bytes });
            }
        }
    }
    restore_upstream_queries(decoded);
}

/// Upstream queries stored without the client's query (the flag QUERY_FROM_CQ) get it back
/// from the CQ, for the messages list. The facts of the line do not need it.
fn restore_upstream_queries(decoded: &mut [Decoded<'_>]) {
    let cq_query = decoded
        .iter()
        .find(|d| d.role == Role::ClientQuery)
        .and_then(|d| d.msg.as_ref().ok())
        .and_then(|m| m.query_message.clone());
    let from_cq = |d: &&mut Decoded<'_>| d.flags & crate::correlate::Message::QUERY_FROM_CQ != 0;
    for d in decoded.iter_mut().filter(from_cq) {
        if let Ok(m) = &mut d.msg {
            m.query_message = cq_query.clone();
        }
    }
}

fn write_summary_fields(j: &mut Json<'_>, s: &Session, d: &Diagnosis) {
    let v = &d.verdict;
    j.field_name("sender", s.profile.name());
    j.key("client");
    match d.client {
        Some(c) => j.socket(c),
        None => j.null(),
    }
    if let Some(extra) = d.extra() {
        // What the sender said about the client (CoreDNS's `extra`), and the workload in it.
        j.field_str("extra", &String::from_utf8_lossy(extra));
        j.field_opt_str("client_namespace", d.client_namespace());
        j.field_opt_str("client_pod", d.client_pod());
    }
    j.key("protocol");
    match d.protocol {
        Some(p) => j.name(protocol_name(p)),
        None => j.null(),
    }
    j.field_opt_str("qname", d.qname());
    field_mnemonic(
        j,
        "qtype",
        d.qtype.map(|t| (Rtype::from_int(t).to_mnemonic_str(), t)),
        rtype_name,
    );
    field_mnemonic(
        j,
        "qclass",
        d.qclass.map(|c| (Class::from_int(c).to_mnemonic_str(), c)),
        class_name,
    );
    j.key("dns_id");
    match s.dns_id {
        Some(id) => j.uint(id as u64),
        None => j.null(),
    }
    field_rcode(j, d.rcode);
    j.key("latency_ms");
    match d.latency {
        Some(l) => j.millis(l),
        None => j.null(),
    }
    j.key("upstreams");
    j.begin_array();
    for a in &d.attempts {
        j.begin_object();
        j.key("address");
        match a.upstream {
            Some(addr) => j.socket(addr),
            None => j.null(),
        }
        j.key("rtt_ms");
        match a.rtt {
            Some(r) => j.millis(r),
            None => j.null(),
        }
        j.key("timeout");
        j.bool(!a.answered);
        field_rcode(j, a.rcode);
        if !a.has_query {
            j.key("query_missing");
            j.bool(true);
        }
        j.end_object();
    }
    j.end_array();
    if let Some(loss) = v.loss {
        j.field_name("loss_reason", loss.name());
    }
    if let Some(inc) = v.incomplete {
        j.key("incomplete");
        j.begin_object();
        j.key("missing");
        j.begin_array();
        for role in inc.missing.names() {
            j.name(role);
        }
        j.end_array();
        j.field_name("cause", inc.cause.name());
        j.end_object();
    }
    if !s.has_wire {
        j.key("wire_messages");
        j.bool(false);
    }
    if s.messages_dropped > 0 {
        j.field_uint("messages_not_kept", s.messages_dropped as u64);
    }
}

/// `"rcode":` and the rcode's mnemonic (plain ASCII), its number, or null.
fn field_rcode(j: &mut Json<'_>, rcode: Option<impl Into<u16>>) {
    j.key("rcode");
    match rcode.map(|r| rcode_name(r.into())) {
        Some(std::borrow::Cow::Borrowed(mnemonic)) => j.name(mnemonic),
        Some(std::borrow::Cow::Owned(number)) => j.string(&number),
        None => j.null(),
    }
}

/// A type or class by its mnemonic (plain ASCII, as `Display` spells it), else `display`'s
/// text (`TYPE65280`): a String only for codes without a mnemonic.
fn field_mnemonic(
    j: &mut Json<'_>,
    name: &'static str,
    code: Option<(Option<&'static str>, u16)>,
    display: fn(u16) -> String,
) {
    j.key(name);
    match code {
        Some((Some(mnemonic), _)) => j.name(mnemonic),
        Some((None, code)) => j.string(&display(code)),
        None => j.null(),
    }
}

fn write_messages(j: &mut Json<'_>, decoded: &[Decoded<'_>]) {
    let mut written_dns = dns_json::WrittenDns::default();
    let mut written_sockets: smallvec::SmallVec<
        [(SocketFields<'_>, Range<usize>); WRITTEN_SOCKETS],
    > = smallvec::SmallVec::new();
    j.begin_array();
    for d in decoded {
        j.begin_object();
        let m = match &d.msg {
            Ok(m) => m,
            Err(u) => {
                write_undecodable(j, d.role, u);
                j.end_object();
                continue;
            }
        };
        j.key("type");
        j.name(message_type_name(m.type_pb));
        for (name, t) in [
            ("query_time", d.query_time()),
            ("response_time", d.response_time()),
        ] {
            if let Some(t) = t {
                j.key(name);
                j.time(t);
            }
        }
        let sockets = SocketFields::of(m);
        match written_sockets.iter().find(|(s, _)| *s == sockets) {
            Some((_, text)) => j.copy_members(text.clone()),
            None => {
                let start = j.out.len();
                write_socket_fields(j, m);
                if written_sockets.len() < WRITTEN_SOCKETS {
                    written_sockets.push((sockets, start..j.out.len()));
                }
            }
        }
        if let Some(zone) = m.query_zone.as_deref() {
            j.key("query_zone");
            write_wire_name(j, zone);
        }
        if let Some(wire) = d.wire() {
            j.key("dns");
            dns_json::write_dns_once(j, wire, &mut written_dns);
        }
        j.end_object();
    }
    j.end_array();
}

/// What a message's socket fields are written from, to find a message whose text for them
/// the line already holds.
#[derive(PartialEq)]
struct SocketFields<'m> {
    family: Option<dnstap::pb::SocketFamily>,
    protocol: Option<dnstap::SocketProtocol>,
    query: (Option<&'m [u8]>, Option<u32>),
    response: (Option<&'m [u8]>, Option<u32>),
}

impl<'m> SocketFields<'m> {
    fn of(m: &'m DnstapMessage<'_>) -> Self {
        Self {
            family: m.socket_family,
            protocol: m.socket_protocol,
            query: (m.query_address.as_deref(), m.query_port),
            response: (m.response_address.as_deref(), m.response_port),
        }
    }
}

/// Socket fields a line remembers: a session's messages mostly have two sets, the client's
/// (its query and response) and the upstream's (each query and response to it).
const WRITTEN_SOCKETS: usize = 2;

/// `socket_family` to `response_port`, each when the message has it (a member, `type`,
/// always precedes them).
fn write_socket_fields(j: &mut Json<'_>, m: &DnstapMessage<'_>) {
    if let Some(f) = m.socket_family {
        j.key("socket_family");
        j.name(match f {
            dnstap::pb::SocketFamily::INET => "INET",
            dnstap::pb::SocketFamily::INET6 => "INET6",
        });
    }
    if let Some(p) = m.socket_protocol {
        j.key("socket_protocol");
        j.name(protocol_name(p));
    }
    for (names, addr, port) in [
        (
            ["query_address", "query_port"],
            m.query_address.as_deref(),
            m.query_port,
        ),
        (
            ["response_address", "response_port"],
            m.response_address.as_deref(),
            m.response_port,
        ),
    ] {
        if let Some(ip) = addr.and_then(dnstap::ip) {
            j.key(names[0]);
            j.ip(ip);
        }
        if let Some(port) = port {
            j.field_uint(names[1], port as u64);
        }
    }
}

/// A stored message that no longer decodes: its role (the dnstap type is inside the bytes),
/// the reason and the bytes, so the line still shows every message the session had.
fn write_undecodable(j: &mut Json<'_>, role: Role, u: &Undecodable<'_>) {
    j.key("type");
    j.name(crate::metrics::model::message_type_name(role));
    j.key("error");
    j.display(crate::metrics::ErrorChain(&u.error));
    j.field_str("hex", &dns_json::hex(u.bytes));
}

fn write_wire_name(j: &mut Json<'_>, wire: &[u8]) {
    match domain::base::Name::from_slice(wire) {
        Ok(name) => j.display(format_args!("{name}")),
        Err(_) => j.string(&dns_json::hex(wire)),
    }
}

fn message_type_name(t: dnstap::MessageType) -> &'static str {
    use dnstap::MessageType::*;
    match t {
        AUTH_QUERY => "AUTH_QUERY",
        AUTH_RESPONSE => "AUTH_RESPONSE",
        RESOLVER_QUERY => "RESOLVER_QUERY",
        RESOLVER_RESPONSE => "RESOLVER_RESPONSE",
        CLIENT_QUERY => "CLIENT_QUERY",
        CLIENT_RESPONSE => "CLIENT_RESPONSE",
        FORWARDER_QUERY => "FORWARDER_QUERY",
        FORWARDER_RESPONSE => "FORWARDER_RESPONSE",
        STUB_QUERY => "STUB_QUERY",
        STUB_RESPONSE => "STUB_RESPONSE",
        TOOL_QUERY => "TOOL_QUERY",
        TOOL_RESPONSE => "TOOL_RESPONSE",
        UPDATE_QUERY => "UPDATE_QUERY",
        UPDATE_RESPONSE => "UPDATE_RESPONSE",
    }
}

fn protocol_name(p: dnstap::SocketProtocol) -> &'static str {
    use dnstap::SocketProtocol::*;
    match p {
        UDP => "UDP",
        TCP => "TCP",
        DOT => "DOT",
        DOH => "DOH",
        DNSCryptUDP => "DNSCryptUDP",
        DNSCryptTCP => "DNSCryptTCP",
        DOQ => "DOQ",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::{Config, Correlator, Verdict};
    use crate::dnstap::{Event, SenderProfile};
    use crate::framestream::{Frame, FrameDecoder};
    use serde_json::Value;

    /// A real CoreDNS capture: one CQ answered from `hosts` (Succeeded/3), whose diagnosis
    /// names the identity.
    const HOSTS: &str = "a_hosts.fstrm";

    /// Bytes that `decode_message` rejects: a field 1 claiming five bytes, holding one.
    const GARBLED: &[u8] = &[0x0a, 0x05, 0x01];

    /// Renders the sessions of a capture as sent by `identity`; `cq_bytes` replaces what is
    /// stored for the client query.
    fn render(fixture: &str, identity: &str, format: Format, cq_bytes: Option<&[u8]>) -> String {
        render_with(fixture, identity, format, cq_bytes, LineOptions::default())
    }

    fn render_with(
        fixture: &str,
        identity: &str,
        format: Format,
        cq_bytes: Option<&[u8]>,
        options: LineOptions,
    ) -> String {
        let path = format!(
            "{}/tests/fixtures/coredns/{fixture}",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut buf = bytes::BytesMut::from(&std::fs::read(path).unwrap()[..]);
        let sources = Arc::new(SourceRegistry::default());
        let source = sources.intern(identity.as_bytes(), b"CoreDNS-1.10.1");
        let renderer = Renderer::new(format, sources).with_options(options);
        let mut corr = Correlator::new(Config {
            idle_flush: false,
            ..Config::default()
        });
        let mut out = Vec::new();
        let mut sink = |s: &Session, v: Verdict, store: &MessageStore| {
            renderer.render(s, &Diagnosis::of(s, v, store), store, &mut out)
        };
        let hasher = crate::dns::key_hasher();
        let decoder = FrameDecoder::new(1 << 20);
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            let Frame::Data(frame) = frame else { continue };
            let tap = dnstap::scan(&frame).unwrap();
            let mut ev = Event::from_fields(&tap, source, SenderProfile::CoreDns, &hasher).unwrap();
            let stored = match cq_bytes {
                Some(b) if ev.role == Role::ClientQuery => b,
                _ => tap.message_bytes,
            };
            corr.on_event(&mut ev, stored, std::time::Instant::now(), &mut sink);
        }
        corr.flush(|_| 0, &mut sink);
        String::from_utf8(out).unwrap()
    }

    fn json_lines(text: &str) -> Vec<Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Whether `decode_message`'s walk read `bytes`; if it did, it read what the generated
    /// decoder reads.
    fn walked_as_decoded(bytes: &[u8]) -> bool {
        // Decoded in place, as lines decode: the walk's message, else the decoder's (or an
        // error where it has one), whatever the walk left in it.
        let mut in_place = DnstapMessage::default();
        let placed = dnstap::decode_message_into(bytes, &mut in_place).map(|()| in_place);
        let decoded = dnstap::decode_generated(bytes);
        assert_eq!(placed.as_ref().ok(), decoded.as_ref().ok(), "{bytes:02x?}");
        let Some(walked) = dnstap::walk_message(bytes) else {
            return false;
        };
        assert_eq!(Some(&walked), decoded.as_ref().ok(), "{bytes:02x?}");
        true
    }

    /// The data frames of every capture under tests/fixtures.
    pub(super) fn captured_frames() -> Vec<Vec<u8>> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let mut captures = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            match std::fs::read_dir(entry.path()) {
                Ok(inner) => captures.extend(inner.flatten().map(|e| e.path())),
                Err(_) => captures.push(entry.path()),
            }
        }
        let mut frames = Vec::new();
        for path in captures
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "fstrm"))
        {
            let mut buf = bytes::BytesMut::from(&std::fs::read(path).unwrap()[..]);
            let decoder = FrameDecoder::new(1 << 20);
            while let Ok(Some(frame)) = decoder.decode(&mut buf) {
                if let Frame::Data(frame) = frame {
                    frames.push(frame.to_vec());
                }
            }
        }
        frames
    }

    /// `bytes` cut short at every length, and with each byte changed in turn (bits flipped,
    /// moved by one or two either way): for a walk that must read what a reference reads,
    /// or leave it to the reference.
    pub(super) fn damaged(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut variants: Vec<Vec<u8>> = (0..bytes.len()).map(|n| bytes[..n].to_vec()).collect();
        for at in 0..bytes.len() {
            let flipped = [0x01, 0x02, 0x07, 0x08, 0x20, 0x3f, 0x40, 0x80, 0xc0, 0xff];
            let moved = [1, 2, 254, 255].map(|d| bytes[at].wrapping_add(d));
            for b in flipped.map(|f| bytes[at] ^ f).into_iter().chain(moved) {
                let mut v = bytes.to_vec();
                v[at] = b;
                variants.push(v);
            }
        }
        variants
    }

    /// Every message of every capture, as stored: with the frame's `extra` after it.
    fn stored_messages() -> Vec<Vec<u8>> {
        let mut stored = Vec::new();
        for frame in captured_frames() {
            let Ok(tap) = dnstap::scan(&frame) else {
                continue;
            };
            let encoded = dnstap::Encoded {
                message: tap.message_bytes,
                extra: tap.extra,
                facts: Default::default(),
            };
            let mut bytes = vec![0; encoded.len()];
            encoded.write_to(&mut bytes);
            stored.push(bytes);
        }
        stored
    }

    #[test]
    fn the_walk_reads_what_the_decoder_reads_in_every_stored_message() {
        let stored = stored_messages();
        let walked = stored.iter().filter(|b| walked_as_decoded(b)).count();
        assert!(stored.len() > 10_000, "{}", stored.len());
        assert!(
            stored.iter().any(|b| dnstap::scan_extra(b).is_some()),
            "some carry an extra"
        );
        assert_eq!(walked, stored.len(), "senders' messages are all walked");
    }

    #[test]
    fn the_walk_reads_what_the_decoder_reads_or_leaves_odd_messages_to_it() {
        // Stored messages cut short and with bytes changed (tags, wire types, lengths,
        // varints): the walk reads what the decoder reads, or nothing.
        let (mut walked, mut left) = (0, 0);
        for bytes in stored_messages().iter().step_by(211) {
            for v in damaged(bytes) {
                match walked_as_decoded(&v) {
                    true => walked += 1,
                    false => left += 1,
                }
            }
        }
        assert!(walked > 1000 && left > 1000, "{walked} walked, {left} left");
    }

    #[test]
    fn a_message_that_no_longer_decodes_is_shown_with_its_bytes() {
        assert!(dnstap::decode_message(GARBLED).is_err());
        let lines = json_lines(&render(HOSTS, "vm", Format::Json, Some(GARBLED)));
        assert_eq!(lines.len(), 1);
        let messages = lines[0]["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert_eq!(
            messages[0],
            serde_json::json!({
                "type": "CLIENT_QUERY",
                "error": "undecodable dnstap protobuf: Cannot decode varint",
                "hex": "0a0501",
            })
        );
        assert_eq!(messages[1]["type"], "CLIENT_RESPONSE");
        // What the CR still tells is kept.
        assert_eq!(lines[0]["client"], "127.0.0.1:56390");
        assert_eq!(lines[0]["qname"], "internal.test.");
    }

    #[test]
    fn an_undecodable_upstream_message_has_the_summary_s_type_name() {
        let mut j = Vec::new();
        let error = dnstap::decode_message(GARBLED).unwrap_err();
        let u = Undecodable {
            error,
            bytes: GARBLED,
        };
        write_undecodable(&mut Json::new(&mut j), Role::UpstreamQuery, &u);
        let text = String::from_utf8(j).unwrap();
        assert!(text.starts_with(r#""type":"FORWARDER_QUERY""#), "{text}");
    }

    #[test]
    fn text_lines_show_the_undecodable_message_too() {
        let line = render(HOSTS, "vm", Format::Text, Some(GARBLED));
        let messages = line.split_once(" Messages: ").unwrap().1;
        let messages: Value = serde_json::from_str(messages.trim_end()).unwrap();
        assert_eq!(messages[0]["hex"], "0a0501");
    }

    #[test]
    fn a_forged_identity_stays_on_its_own_text_line() {
        let forged = "vm\nStatus: Succeeded BitMap: 15 Identity: forged\rStatus: Failed\t\\";
        let text = render(HOSTS, forged, Format::Text, None);
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.ends_with('\n'));
        assert!(!text.contains('\r'));
        let escaped = r"vm\nStatus: Succeeded BitMap: 15 Identity: forged\rStatus: Failed\t\\";
        assert!(text.contains(&format!(
            " Status: Succeeded BitMap: 3 Cause: local_answer Identity: {escaped} Client: "
        )));
        assert!(
            text.contains(&format!("Diagnosis: {escaped} answered NOERROR itself")),
            "{text}"
        );
    }

    #[test]
    fn every_line_starts_with_the_time_of_its_client_query_and_says_its_cause() {
        let raw = render(HOSTS, "vm", Format::Json, None);
        assert!(raw.starts_with("{\"time\":\"2026-"), "{raw}");
        let json = json_lines(&raw);
        let cq_time = &json[0]["messages"][0]["query_time"];
        assert_eq!(json[0]["messages"][0]["type"], "CLIENT_QUERY");
        assert_eq!(&json[0]["time"], cq_time);
        assert_eq!(json[0]["cause"], "local_answer");
        let text = render(HOSTS, "vm", Format::Text, None);
        let expected = format!("Time: {} Status: ", cq_time.as_str().unwrap());
        assert!(text.starts_with(&expected), "{text}");
        // A CQ that no longer decodes still has the time it was correlated with.
        let json = json_lines(&render(HOSTS, "vm", Format::Json, Some(GARBLED)));
        assert_eq!(json[0]["time"], json[0]["messages"][1]["query_time"]);
    }

    #[test]
    fn json_lines_keep_the_identity_exactly() {
        let forged = "vm\nStatus: Succeeded\r";
        let text = render(HOSTS, forged, Format::Json, None);
        assert_eq!(text.matches('\n').count(), 1);
        let lines = json_lines(&text);
        assert_eq!(lines[0]["identity"], forged);
    }

    #[test]
    fn the_question_is_in_presentation_format_in_both_layouts() {
        let json = json_lines(&render(HOSTS, "vm", Format::Json, None));
        let messages = json[0]["messages"].as_array().unwrap();
        assert_eq!(json[0]["qname"], messages[0]["dns"]["question"][0]["name"]);
        let text = render(HOSTS, "vm", Format::Text, None);
        assert!(text.contains(" Question: internal.test. A IN "), "{text}");
    }

    fn sampled(rate: f64, messages: Messages) -> LineOptions {
        LineOptions {
            sample_succeeded: SampleRate::new(rate).unwrap(),
            messages,
        }
    }

    #[test]
    fn a_sampled_succeeded_text_line_says_its_rate_and_may_leave_the_messages_out() {
        let line = render_with(
            HOSTS,
            "vm",
            Format::Text,
            None,
            sampled(0.25, Messages::Failed),
        );
        assert!(
            line.contains(
                " Status: Succeeded BitMap: 3 SampleRate: 0.25 Cause: local_answer Identity: vm "
            ),
            "{line}"
        );
        assert!(!line.contains("Messages:"), "{line}");
        assert!(line.contains(" Rcode: NOERROR Latency: "), "{line}");
        let all = render_with(HOSTS, "vm", Format::Text, None, sampled(1.0, Messages::All));
        assert!(all.contains(" Status: Succeeded BitMap: 3 Cause: local_answer Identity: vm "));
        assert!(all.contains(" Messages: [{"), "{all}");
    }

    #[test]
    fn a_failed_line_is_not_sampled_and_keeps_its_messages_unless_none() {
        let options = sampled(0.25, Messages::Failed);
        let failed = json_lines(&render_with(
            "e_servfail.fstrm",
            "vm",
            Format::Json,
            None,
            options,
        ));
        assert_eq!(failed[0]["status"], "Failed");
        assert!(failed[0].get("sample_rate").is_none(), "{}", failed[0]);
        assert!(failed[0]["messages"]
            .as_array()
            .is_some_and(|m| !m.is_empty()));
        let options = sampled(0.25, Messages::None);
        let bare = json_lines(&render_with(
            "e_servfail.fstrm",
            "vm",
            Format::Json,
            None,
            options,
        ));
        assert!(bare[0].get("messages").is_none(), "{}", bare[0]);
        // Everything but the messages is the same line.
        let mut full = failed[0].clone();
        full.as_object_mut().unwrap().remove("messages");
        assert_eq!(bare[0], full);
        let text = render_with("e_servfail.fstrm", "vm", Format::Text, None, options);
        assert!(
            text.contains(" Status: Failed BitMap: 15 Cause: upstream_error Identity: vm "),
            "{text}"
        );
        assert!(!text.contains("Messages:"), "{text}");
    }
}
