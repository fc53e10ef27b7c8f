//! Framing of tagged messages (`tag: u8, len: i32 (self-inclusive), body`).
//!
//! Two ways to consume a stream:
//! - [`take_message`] splits one whole message off a `BytesMut` (login and auth phases, where
//!   every message is small and handled one at a time);
//! - [`FrameWalker`] walks message boundaries across reads and tells where each message
//!   starts, so the relay can copy, rewrite or drop messages one by one. It only needs the
//!   bodies of the message types the caller asks to inspect; everything else
//!   (DataRow, CopyData, ...) is skipped over, even when it spans many reads, so a large
//!   result streams through in bounded memory.

use std::ops::ControlFlow;

use bytes::{Buf, Bytes, BytesMut};

use crate::limits::{MAX_INSPECTED_MESSAGE, MAX_MESSAGE_LEN};
use crate::ProtocolError;

/// Size of the tag byte plus the length field.
pub const HEADER_LEN: usize = 5;

/// A whole message: its tag and its body (length field excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub tag: u8,
    pub body: &'a [u8],
}

/// What the walker found at a message boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk<'a> {
    /// A complete message of a type the caller inspects.
    Inspect(Message<'a>),
    /// The start of a message relayed without being looked at: not an inspected type, or
    /// longer than [`MAX_INSPECTED_MESSAGE`]. `len` counts the length field and the body.
    Pass { tag: u8, len: usize },
}

/// Reads the header at the start of `buf`, checking the length against `max_len`.
fn header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(ProtocolError::BadLength {
            tag: tag as char,
            len,
        });
    }
    if len > max_len {
        return Err(ProtocolError::TooLong {
            tag: tag as char,
            len,
            limit: max_len,
        });
    }
    Ok(Some((tag, len)))
}

/// Splits one whole message off the front of `buf`, or returns `None` if more bytes are
/// needed. `max_len` bounds the length field, so a peer cannot make us buffer without limit.
pub fn take_message(
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<(u8, Bytes)>, ProtocolError> {
    let Some((tag, len)) = header(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    Ok(Some((tag, buf.split_to(len - 4).freeze())))
}

/// Walks message boundaries across reads; see the module comment.
#[derive(Debug, Default)]
pub struct FrameWalker {
    /// Bytes of a passed-through message that have not arrived yet.
    pass_remaining: usize,
}

impl FrameWalker {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when the stream is at a message boundary (no message partly relayed).
    pub fn at_boundary(&self) -> bool {
        self.pass_remaining == 0
    }

    /// Walks `buf` and returns how many leading bytes may be forwarded now, and whether `on`
    /// stopped the walk. `on` sees each message once, at its start; returning
    /// `ControlFlow::Break(())` stops *before* that message, which stays unconsumed.
    /// Bytes after the returned count are an incomplete header or an incomplete inspected
    /// message: keep them and call again with more data appended.
    pub fn walk<'a>(
        &mut self,
        buf: &'a [u8],
        inspect: impl Fn(u8) -> bool,
        mut on: impl FnMut(Walk<'a>) -> ControlFlow<()>,
    ) -> Result<(usize, bool), ProtocolError> {
        self.walk_at(buf, inspect, |_, w| on(w))
    }

    /// Like [`FrameWalker::walk`], also telling `on` the offset in `buf` where each message
    /// starts, for callers that rewrite the stream message by message.
    pub fn walk_at<'a>(
        &mut self,
        buf: &'a [u8],
        inspect: impl Fn(u8) -> bool,
        mut on: impl FnMut(usize, Walk<'a>) -> ControlFlow<()>,
    ) -> Result<(usize, bool), ProtocolError> {
        let mut pos = self.pass_remaining.min(buf.len());
        self.pass_remaining -= pos;
        if self.pass_remaining > 0 {
            return Ok((pos, false));
        }
        while let Some((tag, len)) = header(&buf[pos..], MAX_MESSAGE_LEN)? {
            let total = 1 + len;
            let available = buf.len() - pos;
            if inspect(tag) && len <= MAX_INSPECTED_MESSAGE {
                if available < total {
                    break;
                }
                let body = &buf[pos + HEADER_LEN..pos + total];
                if on(pos, Walk::Inspect(Message { tag, body })).is_break() {
                    return Ok((pos, true));
                }
                pos += total;
            } else {
                if on(pos, Walk::Pass { tag, len }).is_break() {
                    return Ok((pos, true));
                }
                if available < total {
                    self.pass_remaining = total - available;
                    return Ok((buf.len(), false));
                }
                pos += total;
            }
        }
        Ok((pos, false))
    }
}

/// Appends a message with `tag` whose body is written by `body`, fixing up the length.
pub fn write_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.extend_from_slice(&[tag, 0, 0, 0, 0]);
    let start = out.len() - 4;
    body(out);
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Reads a NUL-terminated string at the front of `buf`, advancing past it.
pub fn read_cstr<'a>(buf: &mut &'a [u8]) -> Result<&'a str, ProtocolError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::Malformed("string without terminator"))?;
    let s = std::str::from_utf8(&buf[..end])
        .map_err(|_| ProtocolError::Malformed("string is not UTF-8"))?;
    *buf = &buf[end + 1..];
    Ok(s)
}

/// Reads a big-endian i32 at the front of `buf`, advancing past it.
pub fn read_i32(buf: &mut &[u8]) -> Result<i32, ProtocolError> {
    if buf.len() < 4 {
        return Err(ProtocolError::Malformed("truncated integer"));
    }
    let v = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    *buf = &buf[4..];
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_message(&mut out, tag, |b| b.extend_from_slice(body));
        out.to_vec()
    }

    fn inspect_z(tag: u8) -> bool {
        tag == b'Z'
    }

    /// Feeds `stream` to a walker in chunks of `chunk` bytes, the way reads arrive, and
    /// returns the inspected bodies, the passed tags and the total forwarded.
    fn walk_in_chunks(stream: &[u8], chunk: usize) -> (Vec<Vec<u8>>, Vec<u8>, usize) {
        let mut walker = FrameWalker::new();
        let mut pending: Vec<u8> = Vec::new();
        let (mut seen, mut passed, mut forwarded) = (Vec::new(), Vec::new(), 0);
        for piece in stream.chunks(chunk) {
            pending.extend_from_slice(piece);
            let (n, stopped) = walker
                .walk(&pending, inspect_z, |w| {
                    match w {
                        Walk::Inspect(m) => seen.push(m.body.to_vec()),
                        Walk::Pass { tag, .. } => passed.push(tag),
                    }
                    ControlFlow::Continue(())
                })
                .expect("valid stream");
            assert!(!stopped);
            forwarded += n;
            pending.drain(..n);
        }
        assert!(pending.is_empty(), "everything forwarded at the end");
        (seen, passed, forwarded)
    }

    #[test]
    fn walks_several_messages_in_one_read_and_across_split_reads() {
        let mut stream = msg(b'D', &[7; 100]);
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"I"));
        stream.extend(msg(b'D', &[1; 3]));
        stream.extend(msg(b'Z', b"T"));
        for chunk in [1, 2, 3, 5, 7, 64, 4096] {
            let (seen, passed, forwarded) = walk_in_chunks(&stream, chunk);
            assert_eq!(seen, vec![b"I".to_vec(), b"T".to_vec()], "chunk {chunk}");
            assert_eq!(passed, vec![b'D', b'C', b'D'], "chunk {chunk}");
            assert_eq!(forwarded, stream.len());
        }
    }

    #[test]
    fn large_passed_message_is_forwarded_before_it_is_complete() {
        let big = msg(b'd', &vec![0; 10_000]);
        let mut walker = FrameWalker::new();
        let (n, _) = walker
            .walk(&big[..100], inspect_z, |_| ControlFlow::Continue(()))
            .expect("valid");
        assert_eq!(n, 100, "partial passthrough bytes can be relayed at once");
        assert!(!walker.at_boundary());
        let (n, _) = walker
            .walk(&big[100..], inspect_z, |_| ControlFlow::Continue(()))
            .expect("valid");
        assert_eq!(n, big.len() - 100);
        assert!(walker.at_boundary());
    }

    #[test]
    fn incomplete_inspected_message_waits_for_more() {
        let z = msg(b'Z', b"I");
        let mut walker = FrameWalker::new();
        let (n, _) = walker
            .walk(&z[..5], inspect_z, |_| ControlFlow::Continue(()))
            .expect("valid");
        assert_eq!(n, 0);
    }

    #[test]
    fn break_stops_before_the_message() {
        let mut stream = msg(b'Q', b"select 1\0");
        stream.extend(msg(b'X', b""));
        let mut walker = FrameWalker::new();
        let (n, stopped) = walker
            .walk(
                &stream,
                |t| t == b'X',
                |w| match w {
                    Walk::Inspect(m) if m.tag == b'X' => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                },
            )
            .expect("valid");
        assert!(stopped);
        assert_eq!(n, stream.len() - 5);
    }

    #[test]
    fn oversized_inspected_message_is_passed_not_buffered() {
        let q = msg(b'Q', &vec![b'a'; MAX_INSPECTED_MESSAGE + 10]);
        let mut walker = FrameWalker::new();
        let mut passed = None;
        let (n, _) = walker
            .walk(
                &q[..64],
                |t| t == b'Q',
                |w| {
                    passed = Some(w);
                    ControlFlow::Continue(())
                },
            )
            .expect("valid");
        assert_eq!(n, 64);
        assert!(matches!(passed, Some(Walk::Pass { tag: b'Q', .. })));
    }

    #[test]
    fn bad_lengths_are_protocol_errors() {
        let mut walker = FrameWalker::new();
        let short = [b'Q', 0, 0, 0, 3];
        assert!(matches!(
            walker.walk(&short, inspect_z, |_| ControlFlow::Continue(())),
            Err(ProtocolError::BadLength { len: 3, .. })
        ));
        let huge = [b'Q', 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            FrameWalker::new().walk(&huge, inspect_z, |_| ControlFlow::Continue(())),
            Err(ProtocolError::TooLong { .. })
        ));
    }

    #[test]
    fn take_message_splits_whole_messages_and_bounds_length() {
        let mut buf = BytesMut::from(&msg(b'p', b"secret\0")[..]);
        buf.extend_from_slice(&msg(b'X', b"")[..3]);
        let (tag, body) = take_message(&mut buf, 100).expect("valid").expect("whole");
        assert_eq!((tag, &body[..]), (b'p', &b"secret\0"[..]));
        assert_eq!(take_message(&mut buf, 100).expect("valid"), None);
        let mut big = BytesMut::from(&msg(b'p', &[1; 200])[..]);
        assert!(take_message(&mut big, 100).is_err());
    }

    #[test]
    fn cstr_and_int_readers_reject_truncation() {
        let mut b: &[u8] = b"abc\0rest";
        assert_eq!(read_cstr(&mut b).expect("terminated"), "abc");
        assert_eq!(b, b"rest");
        assert!(read_cstr(&mut b).is_err());
        let mut i: &[u8] = &[0, 0, 1];
        assert!(read_i32(&mut i).is_err());
    }
}
