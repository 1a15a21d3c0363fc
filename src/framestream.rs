//! Frame Streams (fstrm) codec and the receiver side of its handshake.
//!
//! Pure state machines: bytes go in, frames and replies come out. Sockets live in `ingest`.
//! Wire format: a data frame is `len:u32be payload`; a control frame is `0:u32be len:u32be
//! type:u32be fields...`, each field `1:u32be len:u32be content-type`.

use bytes::{Buf, Bytes, BytesMut};

/// The only content type this receiver speaks.
pub const DNSTAP_CONTENT_TYPE: &[u8] = b"protobuf:dnstap.Dnstap";
/// Control frames are tiny; libfstrm rejects anything over 512 bytes, and so do we.
pub const MAX_CONTROL_FRAME: usize = 512;

const FIELD_CONTENT_TYPE: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    Accept = 1,
    Start = 2,
    Stop = 3,
    Ready = 4,
    Finish = 5,
}

impl ControlKind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Accept,
            2 => Self::Start,
            3 => Self::Stop,
            4 => Self::Ready,
            5 => Self::Finish,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlFrame {
    pub kind: ControlKind,
    pub content_types: Vec<Bytes>,
}

impl ControlFrame {
    fn offers_dnstap(&self) -> bool {
        self.content_types.iter().any(|t| t == DNSTAP_CONTENT_TYPE)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One payload, sharing the read buffer's memory (no copy).
    Data(Bytes),
    Control(ControlFrame),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    DataFrameTooLarge { len: usize, max: usize },
    ControlFrameTooLarge { len: usize },
    MalformedControl(&'static str),
    UnknownControlType(u32),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DataFrameTooLarge { len, max } => {
                write!(
                    f,
                    "data frame of {len} bytes exceeds --max-frame-size {max}"
                )
            }
            Self::ControlFrameTooLarge { len } => write!(
                f,
                "control frame of {len} bytes exceeds {MAX_CONTROL_FRAME} bytes"
            ),
            Self::MalformedControl(why) => write!(f, "malformed control frame: {why}"),
            Self::UnknownControlType(t) => write!(f, "unknown control frame type {t}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Splits a byte stream into frames. Feed it a buffer that grows with each read; it consumes
/// whole frames and leaves partial ones in place until the rest arrives.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_size: usize,
}

impl FrameDecoder {
    pub fn new(max_frame_size: usize) -> Self {
        Self { max_frame_size }
    }

    /// Returns the next complete frame, `Ok(None)` when more bytes are needed, or an error after
    /// which the stream cannot be resynchronised.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Peek::Complete { header, len } = self.peek(buf)? else {
            return Ok(None);
        };
        buf.advance(header);
        let body = buf.split_to(len).freeze();
        Ok(Some(match header {
            DATA_HEADER => Frame::Data(body),
            _ => Frame::Control(parse_control(body)?),
        }))
    }

    /// The frame at the start of `buf`, read in place: how long its header and body are, or
    /// how many bytes it needs in all. Checks the size limits before the frame is buffered.
    pub fn peek(&self, buf: &[u8]) -> Result<Peek, FrameError> {
        let Some(len) = peek_u32(buf, 0) else {
            return Ok(Peek::Incomplete { need: DATA_HEADER });
        };
        let len = len as usize;
        if len != 0 {
            if len > self.max_frame_size {
                return Err(FrameError::DataFrameTooLarge {
                    len,
                    max: self.max_frame_size,
                });
            }
            return Ok(Peek::of(buf, DATA_HEADER, len));
        }
        let Some(clen) = peek_u32(buf, 4) else {
            return Ok(Peek::Incomplete {
                need: CONTROL_HEADER,
            });
        };
        let clen = clen as usize;
        if clen > MAX_CONTROL_FRAME {
            return Err(FrameError::ControlFrameTooLarge { len: clen });
        }
        Ok(Peek::of(buf, CONTROL_HEADER, clen))
    }

    /// How many bytes at the start of `buf` are complete frames: data frames, up to and
    /// including the first control frame (which may change how the rest is read). An error is
    /// returned only when no complete frame comes before it.
    pub fn complete_prefix(&self, buf: &[u8]) -> Result<usize, FrameError> {
        let mut at = 0;
        loop {
            match self.peek(&buf[at..]) {
                Ok(Peek::Complete { header, len }) => {
                    at += header + len;
                    if header == CONTROL_HEADER {
                        return Ok(at);
                    }
                }
                Ok(Peek::Incomplete { .. }) => return Ok(at),
                Err(e) if at == 0 => return Err(e),
                Err(_) => return Ok(at),
            }
        }
    }

    /// The complete frame at the start of `buf` (see [`complete_prefix`](Self::complete_prefix))
    /// and its length with its header; `Ok(None)` when it is not complete.
    pub fn frame_at<'a>(&self, buf: &'a [u8]) -> Result<Option<(FrameAt<'a>, usize)>, FrameError> {
        let Peek::Complete { header, len } = self.peek(buf)? else {
            return Ok(None);
        };
        let body = &buf[header..header + len];
        let frame = match header {
            DATA_HEADER => FrameAt::Data(body),
            // Rare (a handshake's few frames): copied, so the frame owns its content types.
            _ => FrameAt::Control(parse_control(Bytes::copy_from_slice(body))?),
        };
        Ok(Some((frame, header + len)))
    }
}

/// A data frame's header: its length.
const DATA_HEADER: usize = 4;
/// A control frame's header: the escape (0) and its length.
const CONTROL_HEADER: usize = 8;

/// What the start of a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// A whole frame: `header` bytes of header (4 for data, 8 for control), then `len` of body.
    Complete { header: usize, len: usize },
    /// Not yet: the frame (or its header) is `need` bytes long in all.
    Incomplete { need: usize },
}

impl Peek {
    fn of(buf: &[u8], header: usize, len: usize) -> Self {
        match buf.len() >= header + len {
            true => Self::Complete { header, len },
            false => Self::Incomplete { need: header + len },
        }
    }
}

/// A frame read in place (see [`FrameDecoder::frame_at`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameAt<'a> {
    Data(&'a [u8]),
    Control(ControlFrame),
}

fn peek_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn parse_control(mut body: Bytes) -> Result<ControlFrame, FrameError> {
    if body.len() < 4 {
        return Err(FrameError::MalformedControl("shorter than its type"));
    }
    let raw = body.get_u32();
    let kind = ControlKind::from_u32(raw).ok_or(FrameError::UnknownControlType(raw))?;
    let mut content_types = Vec::new();
    while !body.is_empty() {
        if body.len() < 8 {
            return Err(FrameError::MalformedControl("truncated field header"));
        }
        let field = body.get_u32();
        let len = body.get_u32() as usize;
        if len > body.len() {
            return Err(FrameError::MalformedControl("field longer than frame"));
        }
        let value = body.split_to(len);
        if field == FIELD_CONTENT_TYPE {
            content_types.push(value);
        }
    }
    Ok(ControlFrame {
        kind,
        content_types,
    })
}

/// Appends a control frame (escape, length, type, content-type fields) to `out`.
pub fn encode_control(kind: ControlKind, content_types: &[&[u8]], out: &mut Vec<u8>) {
    let body_len: usize = 4 + content_types.iter().map(|t| 8 + t.len()).sum::<usize>();
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.extend_from_slice(&(kind as u32).to_be_bytes());
    for t in content_types {
        out.extend_from_slice(&FIELD_CONTENT_TYPE.to_be_bytes());
        out.extend_from_slice(&(t.len() as u32).to_be_bytes());
        out.extend_from_slice(t);
    }
}

/// Appends one data frame to `out`.
pub fn encode_data(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// What the receiver must do after a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do (a control frame that needs no answer).
    Continue,
    /// Send these bytes back to the sender, then continue.
    Reply(Vec<u8>),
    /// A dnstap payload to decode.
    Data(Bytes),
    /// The sender ended the stream cleanly; send the reply (FINISH) if any, then close.
    Finished(Option<Vec<u8>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The sender offered or started with content types, none of them dnstap.
    UnsupportedContentType(Vec<Bytes>),
    /// A frame that is not allowed in the current state.
    Unexpected {
        state: &'static str,
        got: &'static str,
    },
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnsupportedContentType(types) => {
                let names: Vec<_> = types
                    .iter()
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .collect();
                write!(
                    f,
                    "sender offers content types {names:?}, not protobuf:dnstap.Dnstap"
                )
            }
            Self::Unexpected { state, got } => write!(f, "unexpected {got} while {state}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing seen: READY (bidirectional) or START (unidirectional, or a file).
    Opening,
    /// ACCEPT sent, waiting for START.
    Accepted,
    Streaming {
        bidirectional: bool,
    },
    Stopped,
}

/// The receiver's side of one Frame Streams connection or file.
#[derive(Debug, Clone)]
pub struct ReceiverStream {
    phase: Phase,
    bidirectional: bool,
}

impl Default for ReceiverStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ReceiverStream {
    pub fn new() -> Self {
        Self {
            phase: Phase::Opening,
            bidirectional: false,
        }
    }

    /// True once START has been seen: the handshake deadline no longer applies.
    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Streaming { .. } | Phase::Stopped)
    }

    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    pub fn on_frame(&mut self, frame: Frame) -> Result<Step, ProtocolError> {
        match frame {
            Frame::Data(payload) => self.on_data().map(|()| Step::Data(payload)),
            Frame::Control(c) => self.on_control(c),
        }
    }

    /// A data frame came: fine while streaming (the payload is the caller's to decode).
    pub fn on_data(&self) -> Result<(), ProtocolError> {
        match self.phase {
            Phase::Streaming { .. } => Ok(()),
            _ => Err(self.unexpected("data frame")),
        }
    }

    /// A control frame came: what to do about it. Never `Step::Data`.
    pub fn on_control(&mut self, control: ControlFrame) -> Result<Step, ProtocolError> {
        use ControlKind::*;
        match (self.phase, control.kind) {
            (Phase::Opening, Ready) => {
                if !control.offers_dnstap() {
                    return Err(ProtocolError::UnsupportedContentType(control.content_types));
                }
                self.bidirectional = true;
                self.phase = Phase::Accepted;
                let mut reply = Vec::with_capacity(40);
                encode_control(Accept, &[DNSTAP_CONTENT_TYPE], &mut reply);
                Ok(Step::Reply(reply))
            }
            (Phase::Opening | Phase::Accepted, Start) => {
                // START may omit the content type; if it names one, it must be dnstap.
                if !control.content_types.is_empty() && !control.offers_dnstap() {
                    return Err(ProtocolError::UnsupportedContentType(control.content_types));
                }
                self.phase = Phase::Streaming {
                    bidirectional: self.bidirectional,
                };
                Ok(Step::Continue)
            }
            (Phase::Streaming { bidirectional }, Stop) => {
                self.phase = Phase::Stopped;
                let reply = bidirectional.then(|| {
                    let mut r = Vec::with_capacity(12);
                    encode_control(Finish, &[], &mut r);
                    r
                });
                Ok(Step::Finished(reply))
            }
            (_, kind) => Err(self.unexpected(control_name(kind))),
        }
    }

    fn unexpected(&self, got: &'static str) -> ProtocolError {
        let state = match self.phase {
            Phase::Opening => "waiting for READY or START",
            Phase::Accepted => "waiting for START",
            Phase::Streaming { .. } => "streaming",
            Phase::Stopped => "stopped",
        };
        ProtocolError::Unexpected { state, got }
    }
}

fn control_name(kind: ControlKind) -> &'static str {
    match kind {
        ControlKind::Accept => "ACCEPT",
        ControlKind::Start => "START",
        ControlKind::Stop => "STOP",
        ControlKind::Ready => "READY",
        ControlKind::Finish => "FINISH",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(kind: ControlKind, types: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_control(kind, types, &mut v);
        v
    }

    fn bidirectional_stream() -> Vec<u8> {
        let mut v = control(ControlKind::Ready, &[b"other", DNSTAP_CONTENT_TYPE]);
        v.extend(control(ControlKind::Start, &[DNSTAP_CONTENT_TYPE]));
        encode_data(b"first payload", &mut v);
        encode_data(b"second", &mut v);
        v.extend(control(ControlKind::Stop, &[]));
        v
    }

    /// Drives the decoder and handshake over `chunks`, as a socket would deliver them.
    fn run(chunks: &[&[u8]]) -> (Vec<Step>, Result<(), String>) {
        let dec = FrameDecoder::new(1 << 20);
        let mut rx = ReceiverStream::new();
        let mut buf = BytesMut::new();
        let mut steps = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(f)) => match rx.on_frame(f) {
                        Ok(s) => steps.push(s),
                        Err(e) => return (steps, Err(e.to_string())),
                    },
                    Ok(None) => break,
                    Err(e) => return (steps, Err(e.to_string())),
                }
            }
        }
        (steps, Ok(()))
    }

    #[test]
    fn bidirectional_handshake_replies_accept_and_finish() {
        let (steps, res) = run(&[&bidirectional_stream()]);
        res.unwrap();
        assert_eq!(
            steps,
            vec![
                Step::Reply(control(ControlKind::Accept, &[DNSTAP_CONTENT_TYPE])),
                Step::Continue,
                Step::Data(Bytes::from_static(b"first payload")),
                Step::Data(Bytes::from_static(b"second")),
                Step::Finished(Some(control(ControlKind::Finish, &[]))),
            ]
        );
    }

    #[test]
    fn every_split_offset_gives_the_same_frames() {
        let stream = bidirectional_stream();
        let (whole, _) = run(&[&stream]);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let (steps, res) = run(&[a, b]);
            res.unwrap();
            assert_eq!(steps, whole, "split at byte {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes).0, whole, "one byte per read");
    }

    #[test]
    fn unidirectional_start_without_content_type_streams_and_stop_needs_no_finish() {
        let mut v = control(ControlKind::Start, &[]);
        encode_data(b"x", &mut v);
        v.extend(control(ControlKind::Stop, &[]));
        let (steps, res) = run(&[&v]);
        res.unwrap();
        assert_eq!(
            steps,
            vec![
                Step::Continue,
                Step::Data(Bytes::from_static(b"x")),
                Step::Finished(None)
            ]
        );
    }

    #[test]
    fn wrong_content_type_is_refused_on_ready_and_on_start() {
        let (_, res) = run(&[&control(ControlKind::Ready, &[b"protobuf:other"])]);
        assert!(res.unwrap_err().contains("protobuf:other"));
        let (_, res) = run(&[&control(ControlKind::Start, &[b"text"])]);
        assert!(res.unwrap_err().contains("not protobuf:dnstap.Dnstap"));
    }

    #[test]
    fn data_before_start_and_accept_from_a_sender_are_protocol_errors() {
        let mut v = Vec::new();
        encode_data(b"early", &mut v);
        assert!(run(&[&v]).1.unwrap_err().contains("data frame"));
        let (_, res) = run(&[&control(ControlKind::Accept, &[DNSTAP_CONTENT_TYPE])]);
        assert!(res.unwrap_err().contains("ACCEPT"));
        let mut v = control(ControlKind::Start, &[]);
        v.extend(control(ControlKind::Finish, &[]));
        assert!(run(&[&v]).1.unwrap_err().contains("FINISH while streaming"));
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering_them() {
        let dec = FrameDecoder::new(100);
        let mut buf = BytesMut::from(&101u32.to_be_bytes()[..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::DataFrameTooLarge { len: 101, max: 100 })
        );
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0, 0, 2, 1][..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::ControlFrameTooLarge { len: 513 })
        );
    }

    #[test]
    fn malformed_control_frames_are_errors() {
        let dec = FrameDecoder::new(100);
        for (body, what) in [
            (&[0u8, 0][..], "shorter than its type"),
            (&[0, 0, 0, 9][..], "unknown control frame type 9"),
            (
                &[0, 0, 0, 4, 0, 0, 0, 1, 0, 0][..],
                "truncated field header",
            ),
            (
                &[0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, 9, b'a'][..],
                "field longer than frame",
            ),
        ] {
            let mut buf = BytesMut::new();
            buf.extend_from_slice(&0u32.to_be_bytes());
            buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
            buf.extend_from_slice(body);
            let err = dec.decode(&mut buf).unwrap_err();
            assert!(err.to_string().contains(what), "{err} vs {what}");
        }
    }

    #[test]
    fn every_control_frame_round_trips() {
        let dec = FrameDecoder::new(100);
        for kind in [
            ControlKind::Accept,
            ControlKind::Start,
            ControlKind::Stop,
            ControlKind::Ready,
            ControlKind::Finish,
        ] {
            let mut buf = BytesMut::from(&control(kind, &[DNSTAP_CONTENT_TYPE])[..]);
            let frame = dec.decode(&mut buf).unwrap().unwrap();
            assert_eq!(
                frame,
                Frame::Control(ControlFrame {
                    kind,
                    content_types: vec![Bytes::from_static(DNSTAP_CONTENT_TYPE)]
                })
            );
            assert!(buf.is_empty());
        }
    }
}
