// Automatically generated rust module for 'dnstap.proto' file

#![allow(non_snake_case)]
#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(unused_imports)]
#![allow(unknown_lints)]
#![allow(clippy::all)]
#![cfg_attr(rustfmt, rustfmt_skip)]


use std::borrow::Cow;
use quick_protobuf::{MessageInfo, MessageRead, MessageWrite, BytesReader, Writer, WriterBackend, Result};
use quick_protobuf::sizeofs::*;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum SocketFamily {
    INET = 1,
    INET6 = 2,
}

impl Default for SocketFamily {
    fn default() -> Self {
        SocketFamily::INET
    }
}

impl From<i32> for SocketFamily {
    fn from(i: i32) -> Self {
        match i {
            1 => SocketFamily::INET,
            2 => SocketFamily::INET6,
            _ => Self::default(),
        }
    }
}

impl<'a> From<&'a str> for SocketFamily {
    fn from(s: &'a str) -> Self {
        match s {
            "INET" => SocketFamily::INET,
            "INET6" => SocketFamily::INET6,
            _ => Self::default(),
        }
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum SocketProtocol {
    UDP = 1,
    TCP = 2,
    DOT = 3,
    DOH = 4,
    DNSCryptUDP = 5,
    DNSCryptTCP = 6,
    DOQ = 7,
}

impl Default for SocketProtocol {
    fn default() -> Self {
        SocketProtocol::UDP
    }
}

impl From<i32> for SocketProtocol {
    fn from(i: i32) -> Self {
        match i {
            1 => SocketProtocol::UDP,
            2 => SocketProtocol::TCP,
            3 => SocketProtocol::DOT,
            4 => SocketProtocol::DOH,
            5 => SocketProtocol::DNSCryptUDP,
            6 => SocketProtocol::DNSCryptTCP,
            7 => SocketProtocol::DOQ,
            _ => Self::default(),
        }
    }
}

impl<'a> From<&'a str> for SocketProtocol {
    fn from(s: &'a str) -> Self {
        match s {
            "UDP" => SocketProtocol::UDP,
            "TCP" => SocketProtocol::TCP,
            "DOT" => SocketProtocol::DOT,
            "DOH" => SocketProtocol::DOH,
            "DNSCryptUDP" => SocketProtocol::DNSCryptUDP,
            "DNSCryptTCP" => SocketProtocol::DNSCryptTCP,
            "DOQ" => SocketProtocol::DOQ,
            _ => Self::default(),
        }
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum HttpProtocol {
    HTTP1 = 1,
    HTTP2 = 2,
    HTTP3 = 3,
}

impl Default for HttpProtocol {
    fn default() -> Self {
        HttpProtocol::HTTP1
    }
}

impl From<i32> for HttpProtocol {
    fn from(i: i32) -> Self {
        match i {
            1 => HttpProtocol::HTTP1,
            2 => HttpProtocol::HTTP2,
            3 => HttpProtocol::HTTP3,
            _ => Self::default(),
        }
    }
}

impl<'a> From<&'a str> for HttpProtocol {
    fn from(s: &'a str) -> Self {
        match s {
            "HTTP1" => HttpProtocol::HTTP1,
            "HTTP2" => HttpProtocol::HTTP2,
            "HTTP3" => HttpProtocol::HTTP3,
            _ => Self::default(),
        }
    }
}

#[allow(clippy::derive_partial_eq_without_eq)]
#[derive(Debug, Default, PartialEq, Clone)]
pub struct Dnstap<'a> {
    pub identity: Option<Cow<'a, [u8]>>,
    pub version: Option<Cow<'a, [u8]>>,
    pub extra: Option<Cow<'a, [u8]>>,
    pub type_pb: mod_Dnstap::Type,
    pub message: Option<Message<'a>>,
}

impl<'a> MessageRead<'a> for Dnstap<'a> {
    fn from_reader(r: &mut BytesReader, bytes: &'a [u8]) -> Result<Self> {
        let mut msg = Self::default();
        while !r.is_eof() {
            match r.next_tag(bytes) {
                Ok(10) => msg.identity = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(18) => msg.version = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(26) => msg.extra = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(120) => msg.type_pb = r.read_enum(bytes)?,
                Ok(114) => msg.message = Some(r.read_message::<Message>(bytes)?),
                Ok(t) => { r.read_unknown(bytes, t)?; }
                Err(e) => return Err(e),
            }
        }
        Ok(msg)
    }
}

impl<'a> MessageWrite for Dnstap<'a> {
    fn get_size(&self) -> usize {
        0
        + self.identity.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + self.version.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + self.extra.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + 1 + sizeof_varint(*(&self.type_pb) as u64)
        + self.message.as_ref().map_or(0, |m| 1 + sizeof_len((m).get_size()))
    }

    fn write_message<W: WriterBackend>(&self, w: &mut Writer<W>) -> Result<()> {
        if let Some(ref s) = self.identity { w.write_with_tag(10, |w| w.write_bytes(&**s))?; }
        if let Some(ref s) = self.version { w.write_with_tag(18, |w| w.write_bytes(&**s))?; }
        if let Some(ref s) = self.extra { w.write_with_tag(26, |w| w.write_bytes(&**s))?; }
        w.write_with_tag(120, |w| w.write_enum(*&self.type_pb as i32))?;
        if let Some(ref s) = self.message { w.write_with_tag(114, |w| w.write_message(s))?; }
        Ok(())
    }
}

pub mod mod_Dnstap {


#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Type {
    MESSAGE = 1,
}

impl Default for Type {
    fn default() -> Self {
        Type::MESSAGE
    }
}

impl From<i32> for Type {
    fn from(i: i32) -> Self {
        match i {
            1 => Type::MESSAGE,
            _ => Self::default(),
        }
    }
}

impl<'a> From<&'a str> for Type {
    fn from(s: &'a str) -> Self {
        match s {
            "MESSAGE" => Type::MESSAGE,
            _ => Self::default(),
        }
    }
}

}

#[allow(clippy::derive_partial_eq_without_eq)]
#[derive(Debug, Default, PartialEq, Clone)]
pub struct Policy<'a> {
    pub type_pb: Option<Cow<'a, str>>,
    pub rule: Option<Cow<'a, [u8]>>,
    pub action: Option<mod_Policy::Action>,
    pub match_pb: Option<mod_Policy::Match>,
    pub value: Option<Cow<'a, [u8]>>,
}

impl<'a> MessageRead<'a> for Policy<'a> {
    fn from_reader(r: &mut BytesReader, bytes: &'a [u8]) -> Result<Self> {
        let mut msg = Self::default();
        while !r.is_eof() {
            match r.next_tag(bytes) {
                Ok(10) => msg.type_pb = Some(r.read_string(bytes).map(Cow::Borrowed)?),
                Ok(18) => msg.rule = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(24) => msg.action = Some(r.read_enum(bytes)?),
                Ok(32) => msg.match_pb = Some(r.read_enum(bytes)?),
                Ok(42) => msg.value = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(t) => { r.read_unknown(bytes, t)?; }
                Err(e) => return Err(e),
            }
        }
        Ok(msg)
    }
}

impl<'a> MessageWrite for Policy<'a> {
    fn get_size(&self) -> usize {
        0
        + self.type_pb.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + self.rule.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + self.action.as_ref().map_or(0, |m| 1 + sizeof_varint(*(m) as u64))
        + self.match_pb.as_ref().map_or(0, |m| 1 + sizeof_varint(*(m) as u64))
        + self.value.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
    }

    fn write_message<W: WriterBackend>(&self, w: &mut Writer<W>) -> Result<()> {
        if let Some(ref s) = self.type_pb { w.write_with_tag(10, |w| w.write_string(&**s))?; }
        if let Some(ref s) = self.rule { w.write_with_tag(18, |w| w.write_bytes(&**s))?; }
        if let Some(ref s) = self.action { w.write_with_tag(24, |w| w.write_enum(*s as i32))?; }
        if let Some(ref s) = self.match_pb { w.write_with_tag(32, |w| w.write_enum(*s as i32))?; }
        if let Some(ref s) = self.value { w.write_with_tag(42, |w| w.write_bytes(&**s))?; }
        Ok(())
    }
}

pub mod mod_Policy {


#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Match {
    QNAME = 1,
    CLIENT_IP = 2,
    RESPONSE_IP = 3,
    NS_NAME = 4,
    NS_IP = 5,
}

impl Default for Match {
    fn default() -> Self {
        Match::QNAME
    }
}

impl From<i32> for Match {
    fn from(i: i32) -> Self {
        match i {
            1 => Match::QNAME,
            2 => Match::CLIENT_IP,
            3 => Match::RESPONSE_IP,
            4 => Match::NS_NAME,
            5 => Match::NS_IP,
            _ => Self::default(),
        }
    }
}

impl<'a> From<&'a str> for Match {
    fn from(s: &'a str) -> Self {
        match s {
            "QNAME" => Match::QNAME,
            "CLIENT_IP" => Match::CLIENT_IP,
            "RESPONSE_IP" => Match::RESPONSE_IP,
            "NS_NAME" => Match::NS_NAME,
            "NS_IP" => Match::NS_IP,
            _ => Self::default(),
        }
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Action {
    NXDOMAIN = 1,
    NODATA = 2,
    PASS = 3,
    DROP = 4,
    TRUNCATE = 5,
    LOCAL_DATA = 6,
}

impl Default for Action {
    fn default() -> Self {
        Action::NXDOMAIN
    }
}

impl From<i32> for Action {
    fn from(i: i32) -> Self {
        match i {
            1 => Action::NXDOMAIN,
            2 => Action::NODATA,
            3 => Action::PASS,
            4 => Action::DROP,
            5 => Action::TRUNCATE,
            6 => Action::LOCAL_DATA,
            _ => Self::default(),
        }
    }
}

impl<'a> From<&'a str> for Action {
    fn from(s: &'a str) -> Self {
        match s {
            "NXDOMAIN" => Action::NXDOMAIN,
            "NODATA" => Action::NODATA,
            "PASS" => Action::PASS,
            "DROP" => Action::DROP,
            "TRUNCATE" => Action::TRUNCATE,
            "LOCAL_DATA" => Action::LOCAL_DATA,
            _ => Self::default(),
        }
    }
}

}

#[allow(clippy::derive_partial_eq_without_eq)]
#[derive(Debug, Default, PartialEq, Clone)]
pub struct Message<'a> {
    pub type_pb: mod_Message::Type,
    pub socket_family: Option<SocketFamily>,
    pub socket_protocol: Option<SocketProtocol>,
    pub query_address: Option<Cow<'a, [u8]>>,
    pub response_address: Option<Cow<'a, [u8]>>,
    pub query_port: Option<u32>,
    pub response_port: Option<u32>,
    pub query_time_sec: Option<u64>,
    pub query_time_nsec: Option<u32>,
    pub query_message: Option<Cow<'a, [u8]>>,
    pub query_zone: Option<Cow<'a, [u8]>>,
    pub response_time_sec: Option<u64>,
    pub response_time_nsec: Option<u32>,
    pub response_message: Option<Cow<'a, [u8]>>,
    pub policy: Option<Policy<'a>>,
    pub http_protocol: Option<HttpProtocol>,
}

impl<'a> MessageRead<'a> for Message<'a> {
    fn from_reader(r: &mut BytesReader, bytes: &'a [u8]) -> Result<Self> {
        let mut msg = Self::default();
        while !r.is_eof() {
            match r.next_tag(bytes) {
                Ok(8) => msg.type_pb = r.read_enum(bytes)?,
                Ok(16) => msg.socket_family = Some(r.read_enum(bytes)?),
                Ok(24) => msg.socket_protocol = Some(r.read_enum(bytes)?),
                Ok(34) => msg.query_address = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(42) => msg.response_address = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(48) => msg.query_port = Some(r.read_uint32(bytes)?),
                Ok(56) => msg.response_port = Some(r.read_uint32(bytes)?),
                Ok(64) => msg.query_time_sec = Some(r.read_uint64(bytes)?),
                Ok(77) => msg.query_time_nsec = Some(r.read_fixed32(bytes)?),
                Ok(82) => msg.query_message = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(90) => msg.query_zone = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(96) => msg.response_time_sec = Some(r.read_uint64(bytes)?),
                Ok(109) => msg.response_time_nsec = Some(r.read_fixed32(bytes)?),
                Ok(114) => msg.response_message = Some(r.read_bytes(bytes).map(Cow::Borrowed)?),
                Ok(122) => msg.policy = Some(r.read_message::<Policy>(bytes)?),
                Ok(128) => msg.http_protocol = Some(r.read_enum(bytes)?),
                Ok(t) => { r.read_unknown(bytes, t)?; }
                Err(e) => return Err(e),
            }
        }
        Ok(msg)
    }
}

impl<'a> MessageWrite for Message<'a> {
    fn get_size(&self) -> usize {
        0
        + 1 + sizeof_varint(*(&self.type_pb) as u64)
        + self.socket_family.as_ref().map_or(0, |m| 1 + sizeof_varint(*(m) as u64))
        + self.socket_protocol.as_ref().map_or(0, |m| 1 + sizeof_varint(*(m) as u64))
        + self.query_address.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + self.response_address.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + self.query_port.as_ref().map_or(0, |m| 1 + sizeof_varint(*(m) as u64))
        + self.response_port.as_ref().map_or(0, |m| 1 + sizeof_varint(*(m) as u64))
        + self.query_time_sec.as_ref().map_or(0, |m| 1 + sizeof_varint(*(m) as u64))
        + self.query_time_nsec.as_ref().map_or(0, |_| 1 + 4)
        + self.query_message.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + self.query_zone.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + self.response_time_sec.as_ref().map_or(0, |m| 1 + sizeof_varint(*(m) as u64))
        + self.response_time_nsec.as_ref().map_or(0, |_| 1 + 4)
        + self.response_message.as_ref().map_or(0, |m| 1 + sizeof_len((m).len()))
        + self.policy.as_ref().map_or(0, |m| 1 + sizeof_len((m).get_size()))
        + self.http_protocol.as_ref().map_or(0, |m| 2 + sizeof_varint(*(m) as u64))
    }

    fn write_message<W: WriterBackend>(&self, w: &mut Writer<W>) -> Result<()> {
        w.write_with_tag(8, |w| w.write_enum(*&self.type_pb as i32))?;
        if let Some(ref s) = self.socket_family { w.write_with_tag(16, |w| w.write_enum(*s as i32))?; }
        if let Some(ref s) = self.socket_protocol { w.write_with_tag(24, |w| w.write_enum(*s as i32))?; }
        if let Some(ref s) = self.query_address { w.write_with_tag(34, |w| w.write_bytes(&**s))?; }
        if let Some(ref s) = self.response_address { w.write_with_tag(42, |w| w.write_bytes(&**s))?; }
        if let Some(ref s) = self.query_port { w.write_with_tag(48, |w| w.write_uint32(*s))?; }
        if let Some(ref s) = self.response_port { w.write_with_tag(56, |w| w.write_uint32(*s))?; }
        if let Some(ref s) = self.query_time_sec { w.write_with_tag(64, |w| w.write_uint64(*s))?; }
        if let Some(ref s) = self.query_time_nsec { w.write_with_tag(77, |w| w.write_fixed32(*s))?; }
        if let Some(ref s) = self.query_message { w.write_with_tag(82, |w| w.write_bytes(&**s))?; }
        if let Some(ref s) = self.query_zone { w.write_with_tag(90, |w| w.write_bytes(&**s))?; }
        if let Some(ref s) = self.response_time_sec { w.write_with_tag(96, |w| w.write_uint64(*s))?; }
        if let Some(ref s) = self.response_time_nsec { w.write_with_tag(109, |w| w.write_fixed32(*s))?; }
        if let Some(ref s) = self.response_message { w.write_with_tag(114, |w| w.write_bytes(&**s))?; }
        if let Some(ref s) = self.policy { w.write_with_tag(122, |w| w.write_message(s))?; }
        if let Some(ref s) = self.http_protocol { w.write_with_tag(128, |w| w.write_enum(*s as i32))?; }
        Ok(())
    }
}

pub mod mod_Message {


#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Type {
    AUTH_QUERY = 1,
    AUTH_RESPONSE = 2,
    RESOLVER_QUERY = 3,
    RESOLVER_RESPONSE = 4,
    CLIENT_QUERY = 5,
    CLIENT_RESPONSE = 6,
    FORWARDER_QUERY = 7,
    FORWARDER_RESPONSE = 8,
    STUB_QUERY = 9,
    STUB_RESPONSE = 10,
    TOOL_QUERY = 11,
    TOOL_RESPONSE = 12,
    UPDATE_QUERY = 13,
    UPDATE_RESPONSE = 14,
}

impl Default for Type {
    fn default() -> Self {
        Type::AUTH_QUERY
    }
}

impl From<i32> for Type {
    fn from(i: i32) -> Self {
        match i {
            1 => Type::AUTH_QUERY,
            2 => Type::AUTH_RESPONSE,
            3 => Type::RESOLVER_QUERY,
            4 => Type::RESOLVER_RESPONSE,
            5 => Type::CLIENT_QUERY,
            6 => Type::CLIENT_RESPONSE,
            7 => Type::FORWARDER_QUERY,
            8 => Type::FORWARDER_RESPONSE,
            9 => Type::STUB_QUERY,
            10 => Type::STUB_RESPONSE,
            11 => Type::TOOL_QUERY,
            12 => Type::TOOL_RESPONSE,
            13 => Type::UPDATE_QUERY,
            14 => Type::UPDATE_RESPONSE,
            _ => Self::default(),
        }
    }
}

impl<'a> From<&'a str> for Type {
    fn from(s: &'a str) -> Self {
        match s {
            "AUTH_QUERY" => Type::AUTH_QUERY,
            "AUTH_RESPONSE" => Type::AUTH_RESPONSE,
            "RESOLVER_QUERY" => Type::RESOLVER_QUERY,
            "RESOLVER_RESPONSE" => Type::RESOLVER_RESPONSE,
            "CLIENT_QUERY" => Type::CLIENT_QUERY,
            "CLIENT_RESPONSE" => Type::CLIENT_RESPONSE,
            "FORWARDER_QUERY" => Type::FORWARDER_QUERY,
            "FORWARDER_RESPONSE" => Type::FORWARDER_RESPONSE,
            "STUB_QUERY" => Type::STUB_QUERY,
            "STUB_RESPONSE" => Type::STUB_RESPONSE,
            "TOOL_QUERY" => Type::TOOL_QUERY,
            "TOOL_RESPONSE" => Type::TOOL_RESPONSE,
            "UPDATE_QUERY" => Type::UPDATE_QUERY,
            "UPDATE_RESPONSE" => Type::UPDATE_RESPONSE,
            _ => Self::default(),
        }
    }
}

}

