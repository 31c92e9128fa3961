//! Linkerd's transport header, sent by a client that negotiated ALPN `transport.l5d.io/v1`
//! before the connection's own bytes:
//!
//! ```text
//! "transport.l5d.io/v1\r\n\r\n"   23-byte preface
//! u32, big endian                 length of the message that follows (at most MAX_LEN here)
//! protobuf transport.l5d.io.Header {
//!     int32 port = 1;                            // the target port (1..65535)
//!     string name = 2;                           // a logical name, for gateways (ignored here)
//!     SessionProtocol session_protocol = 3;      // oneof { Http1 http1 = 1; Http2 http2 = 2; }
//! }
//! ```
//!
//! Read with exact-size reads, so no byte of the connection after the header is consumed.

use tokio::io::{AsyncRead, AsyncReadExt};

/// The preface that starts a transport header.
pub const PREFACE: &[u8] = b"transport.l5d.io/v1\r\n\r\n";

/// The largest header message accepted, in bytes. A real one holds a port, a DNS name of at
/// most 253 bytes and a protocol: well under this.
pub const MAX_LEN: u32 = 4096;

/// The session protocol a header announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionProtocol {
    /// HTTP/1.x follows.
    Http1,
    /// HTTP/2 follows (prior knowledge).
    Http2,
}

/// A decoded transport header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportHeader {
    /// The target port.
    pub port: u16,
    /// The logical name, if any (Linkerd's gateways use it; empty for a mesh-expansion host).
    pub name: Option<String>,
    /// The session protocol, if announced; `None`: opaque bytes.
    pub protocol: Option<SessionProtocol>,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The connection ended or failed inside the header.
    #[error("transport header truncated: {0}")]
    Truncated(#[source] std::io::Error),
    /// The bytes do not start with the preface.
    #[error("no transport header preface")]
    NoPreface,
    /// The announced length is beyond [`MAX_LEN`].
    #[error("transport header length {0} exceeds the limit of {MAX_LEN} bytes")]
    TooLong(u32),
    /// The message is not a `transport.l5d.io.Header`.
    #[error("transport header does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The port is not 1..65535.
    #[error("transport header port {0} is not 1..65535")]
    BadPort(i32),
}

mod proto {
    /// `transport.l5d.io.Header`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Header {
        #[prost(int32, tag = "1")]
        pub port: i32,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, optional, tag = "3")]
        pub session_protocol: Option<SessionProtocol>,
    }

    /// `transport.l5d.io.SessionProtocol`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionProtocol {
        #[prost(oneof = "Kind", tags = "1, 2")]
        pub kind: Option<Kind>,
    }

    /// Its `kind` oneof.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Http1(Empty),
        #[prost(message, tag = "2")]
        Http2(Empty),
    }

    /// `SessionProtocol.Http1` and `.Http2`: empty messages.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}
}

/// Reads one header from `io` (preface, length, message), bounded by [`MAX_LEN`].
pub async fn read<R: AsyncRead + Unpin>(io: &mut R) -> Result<TransportHeader, HeaderError> {
    let mut start = [0u8; PREFACE.len() + 4];
    io.read_exact(&mut start)
        .await
        .map_err(HeaderError::Truncated)?;
    let (preface, len) = start.split_at(PREFACE.len());
    if preface != PREFACE {
        return Err(HeaderError::NoPreface);
    }
    let len = u32::from_be_bytes(len.try_into().unwrap_or_default());
    if len > MAX_LEN {
        return Err(HeaderError::TooLong(len));
    }
    let mut msg = vec![0u8; len as usize];
    io.read_exact(&mut msg)
        .await
        .map_err(HeaderError::Truncated)?;
    decode(&msg)
}

/// Decodes a header message (the bytes after the preface and the length).
pub fn decode(msg: &[u8]) -> Result<TransportHeader, HeaderError> {
    let h = <proto::Header as prost::Message>::decode(msg)?;
    let port = u16::try_from(h.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(HeaderError::BadPort(h.port))?;
    let protocol = h.session_protocol.and_then(|p| p.kind).map(|k| match k {
        proto::Kind::Http1(_) => SessionProtocol::Http1,
        proto::Kind::Http2(_) => SessionProtocol::Http2,
    });
    Ok(TransportHeader {
        port,
        name: (!h.name.is_empty()).then_some(h.name),
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes as a linkerd2-proxy writes them, built by hand (not with this module's types).
    fn wire(port: u8, name: &str, protocol: Option<u8>) -> Vec<u8> {
        let mut msg = vec![0x08, port];
        if !name.is_empty() {
            msg.push(0x12);
            msg.push(name.len() as u8);
            msg.extend_from_slice(name.as_bytes());
        }
        if let Some(tag) = protocol {
            msg.extend_from_slice(&[0x1a, 2, tag, 0]);
        }
        let mut out = PREFACE.to_vec();
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(&msg);
        out
    }

    #[tokio::test]
    async fn reads_exactly_the_header_and_leaves_the_rest() {
        let mut bytes = wire(80, "web.example", Some(0x12));
        bytes.extend_from_slice(b"after");
        let mut r = &bytes[..];
        let h = read(&mut r).await.unwrap();
        assert_eq!(
            h,
            TransportHeader {
                port: 80,
                name: Some("web.example".into()),
                protocol: Some(SessionProtocol::Http2),
            }
        );
        assert_eq!(r, b"after");
        let h = read(&mut &wire(81, "", Some(0x0a))[..]).await.unwrap();
        assert_eq!(
            (h.port, h.name, h.protocol),
            (81, None, Some(SessionProtocol::Http1))
        );
        let h = read(&mut &wire(82, "", None)[..]).await.unwrap();
        assert_eq!(h.protocol, None);
    }

    #[tokio::test]
    async fn refuses_bad_headers() {
        let good = wire(80, "", None);
        let truncated = &good[..good.len() - 1];
        assert!(matches!(
            read(&mut &truncated[..]).await,
            Err(HeaderError::Truncated(_))
        ));
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&(1u32 << 20).to_be_bytes());
        assert!(matches!(
            read(&mut &huge[..]).await,
            Err(HeaderError::TooLong(1_048_576))
        ));
        let mut other = good.clone();
        other[0] = b'X';
        assert!(matches!(
            read(&mut &other[..]).await,
            Err(HeaderError::NoPreface)
        ));
        assert!(matches!(decode(&[0x08, 0]), Err(HeaderError::BadPort(0))));
        // port = 70000 (varint)
        assert!(matches!(
            decode(&[0x08, 0xf0, 0xa2, 0x04]),
            Err(HeaderError::BadPort(70000))
        ));
        assert!(matches!(
            decode(&[0x12, 9, b'x']),
            Err(HeaderError::Decode(_))
        ));
    }
}
