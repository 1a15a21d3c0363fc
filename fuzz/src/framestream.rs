//! Target 1: Frame Streams decoder and receiver state machine.
//!
//! Input: byte 0 picks `--max-frame-size`, byte 1 seeds the chunking, the rest is the stream.
//! Properties: no panic; the frames and the error are the same whether the stream arrives
//! whole or in arbitrary chunks; `Ok(None)` consumes nothing; a data frame is at most
//! `max_frame_size` and re-encodes to exactly the bytes it consumed; a control frame is at most
//! 512 bytes; the receiver yields data only once established, stops after `Finished`, and its
//! replies are well-formed ACCEPT (dnstap) or FINISH control frames.

use bytes::BytesMut;
use dnstap_analyser::framestream::{
    encode_data, ControlKind, Frame, FrameDecoder, FrameError, ReceiverStream, Step,
    DNSTAP_CONTENT_TYPE, MAX_CONTROL_FRAME,
};
use dnstap_analyser::metrics::ErrorChain;

#[derive(Debug, PartialEq)]
enum Outcome {
    Frame(Frame),
    Error(FrameError),
}

pub fn check(data: &[u8]) {
    let [size, chunking, stream @ ..] = data else {
        return;
    };
    let max = max_frame_size(*size);
    let whole = decode_all(max, std::iter::once(stream));
    let chunked = decode_all(max, chunks(stream, *chunking));
    assert_eq!(whole.0, chunked.0, "chunking changed the frames");
    // After an error the chunked run stops reading, so only a clean run leaves the same rest.
    if !matches!(whole.0.last(), Some(Outcome::Error(_))) {
        assert_eq!(whole.1, chunked.1, "chunking changed the bytes left over");
    }
    receive(&whole.0);
}

/// Small sizes reach the limit checks; 0 is a legal (if useless) setting too.
fn max_frame_size(b: u8) -> usize {
    match b & 3 {
        0 => (b >> 2) as usize,
        1 => 64 + (b >> 2) as usize * 8,
        2 => 4096,
        _ => 1 << 20,
    }
}

/// Chunk lengths from a tiny LCG: 1..=16 bytes, with the occasional empty read.
fn chunks(stream: &[u8], seed: u8) -> impl Iterator<Item = &[u8]> {
    let mut state = seed as u32 | 1;
    let mut rest = stream;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) % 17) as usize;
        let (head, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        Some(head)
    })
}

/// Feeds the chunks into a growing buffer, decoding after each, until an error.
/// Returns the outcomes and the bytes left undecoded.
fn decode_all<'a>(max: usize, chunks: impl Iterator<Item = &'a [u8]>) -> (Vec<Outcome>, Vec<u8>) {
    let decoder = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            match decoder.decode(&mut buf) {
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) consumed bytes");
                    break;
                }
                Ok(Some(frame)) => {
                    let consumed = &before[..before.len() - buf.len()];
                    check_frame(&frame, consumed, max);
                    out.push(Outcome::Frame(frame));
                }
                Err(e) => {
                    let _ = ErrorChain(&e).to_string();
                    out.push(Outcome::Error(e));
                    return (out, buf.to_vec());
                }
            }
        }
    }
    (out, buf.to_vec())
}

fn check_frame(frame: &Frame, consumed: &[u8], max: usize) {
    match frame {
        Frame::Data(payload) => {
            assert!(
                !payload.is_empty(),
                "empty data frame (length 0 is the escape)"
            );
            assert!(payload.len() <= max, "data frame over max_frame_size");
            let mut again = Vec::new();
            encode_data(payload, &mut again);
            assert_eq!(
                again, consumed,
                "data frame does not re-encode to its bytes"
            );
        }
        Frame::Control(c) => {
            assert!(
                consumed.len() <= 8 + MAX_CONTROL_FRAME,
                "control frame over 512"
            );
            let types: usize = c.content_types.iter().map(|t| t.len()).sum();
            assert!(types <= MAX_CONTROL_FRAME);
        }
    }
}

/// Runs the frames through the receiver as a connection would: until an error or STOP.
fn receive(outcomes: &[Outcome]) {
    let mut rx = ReceiverStream::new();
    let mut started = false;
    for outcome in outcomes {
        let Outcome::Frame(frame) = outcome else {
            return;
        };
        assert!(!rx.is_stopped(), "frame accepted after STOP");
        let is_start = matches!(frame, Frame::Control(c) if c.kind == ControlKind::Start);
        match rx.on_frame(frame.clone()) {
            Ok(Step::Data(payload)) => {
                assert!(started && rx.is_established(), "data before START");
                assert_eq!(Frame::Data(payload), *frame, "payload changed");
            }
            Ok(Step::Continue) => {
                started |= is_start;
                assert_eq!(rx.is_established(), started);
            }
            Ok(Step::Reply(reply)) => {
                assert_eq!(
                    single_control(&reply),
                    (ControlKind::Accept, vec![DNSTAP_CONTENT_TYPE.to_vec()])
                );
                assert!(!rx.is_established());
            }
            Ok(Step::Finished(reply)) => {
                assert!(started && rx.is_stopped(), "finished without START");
                if let Some(r) = reply {
                    assert_eq!(single_control(&r), (ControlKind::Finish, vec![]));
                }
                return;
            }
            Err(e) => {
                let _ = ErrorChain(&e).to_string();
                return;
            }
        }
    }
}

/// The one control frame `bytes` must consist of.
fn single_control(bytes: &[u8]) -> (ControlKind, Vec<Vec<u8>>) {
    let mut buf = BytesMut::from(bytes);
    let frame = FrameDecoder::new(0).decode(&mut buf);
    assert!(buf.is_empty(), "reply has trailing bytes");
    match frame {
        Ok(Some(Frame::Control(c))) => {
            (c.kind, c.content_types.iter().map(|t| t.to_vec()).collect())
        }
        other => panic!("reply is not a control frame: {other:?}"),
    }
}
