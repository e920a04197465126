//! Heads as the gateway keeps them: header fields left in the bytes they arrived in, with their
//! places, and the fields the gateway adds beside them ([`Fields`]); a request ([`Req`]) and
//! an answer ([`Answer`]) made of such fields, their line's parts and a body.
//!
//! Building an `http::HeaderMap` costs a name lookup and a hash per field, and writing it out
//! again another pass: making, editing and writing such maps (and the `http::Request` and
//! `Response` around them) cost about 1.4 µs of the 13.4 µs of CPU a proxied request took
//! (see the README's benchmark figures). A head that arrives on
//! the wire and leaves on the wire needs none of that: its fields are found by a scan of a few
//! entries, edited in place, and written back from the bytes they came in. Conversion to and
//! from `http` types happens only where hyper carries the message (HTTP/2, HTTPS upstreams,
//! hand-overs to hyper's server).
//!
//! Names compare case-insensitively and are written as they came; every field added is checked
//! (a token for a name, no control character but tab in a value), so nothing the gateway adds
//! can split a head.

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Uri, Version};

/// Marks a place in the added bytes rather than the received ones.
const ADDED: u32 = 1 << 31;

/// Where a name or a value is: a range of the received head, or of the added bytes.
#[derive(Clone, Copy, Debug)]
struct Place {
    start: u32,
    len: u32,
}

/// Where httparse's fields are in the head they were parsed from: taken while the parse
/// borrows the read buffer, then given with the head split off it to [`Fields::parsed`].
pub struct Places {
    list: Vec<(Place, Place)>,
    end: usize,
}

impl Places {
    /// The places of `fields` in `head` (the bytes they point into), with room for `room`
    /// fields more; `None` when one is not in `head`.
    pub fn of(head: &[u8], fields: &[httparse::Header<'_>], room: usize) -> Option<Places> {
        let start = head.as_ptr() as usize;
        let mut end = 0;
        let mut place = |s: &[u8]| -> Option<Place> {
            let at = (s.as_ptr() as usize).checked_sub(start)?;
            end = end.max(at + s.len());
            (at + s.len() <= head.len()).then_some(Place {
                start: u32::try_from(at).ok().filter(|a| a & ADDED == 0)?,
                len: s.len() as u32,
            })
        };
        let mut list = Vec::with_capacity(fields.len() + room);
        for f in fields {
            list.push((place(f.name.as_bytes())?, place(f.value)?));
        }
        Some(Places { list, end })
    }
}

/// A head's header fields, in order.
#[derive(Clone, Default)]
pub struct Fields {
    /// The head as received (shared): the parsed fields point into it.
    received: Bytes,
    /// Names and values the gateway added.
    added: Vec<u8>,
    list: Vec<(Place, Place)>,
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(n, v)| (String::from_utf8_lossy(n), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

/// The bytes of an RFC 9110 token (a field name), as a table.
const TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'!' | b'#'..=b'\'' | b'*' | b'+' | b'-' | b'.' | b'^'..=b'`' | b'|' | b'~');
        b += 1;
    }
    t
};

/// Whether `name` is a field name (an RFC 9110 token).
pub fn is_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| TOKEN[usize::from(b)])
}

/// Whether `value` may be a field value: no control character but horizontal tab.
pub fn is_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A value as text, when it is visible ASCII, spaces and tabs (as `HeaderValue::to_str`).
pub fn as_str(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

/// Whether a comma-separated field value lists `token` (case-insensitively).
pub fn lists(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

impl Fields {
    /// No fields, with room for `n`.
    pub fn with_capacity(n: usize) -> Fields {
        Fields {
            received: Bytes::new(),
            added: Vec::new(),
            list: Vec::with_capacity(n),
        }
    }

    /// The fields httparse parsed, with the head they point into (split off its buffer
    /// after [`Places::of`]); the head given back when a place lies outside it.
    pub fn parsed(head: Bytes, places: Places) -> Result<Fields, Bytes> {
        if places.end > head.len() {
            return Err(head);
        }
        Ok(Fields {
            received: head,
            added: Vec::new(),
            list: places.list,
        })
    }

    fn bytes(&self, p: Place) -> &[u8] {
        Fields::place_of(&self.received, &self.added, p)
    }

    /// Every field, as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.list
            .iter()
            .map(|(n, v)| (self.bytes(*n), self.bytes(*v)))
    }

    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The values of the fields named `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.list
            .iter()
            .filter(move |(n, _)| self.bytes(*n).eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| self.bytes(*v))
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.list.iter().find_map(|(n, v)| {
            self.bytes(*n)
                .eq_ignore_ascii_case(name.as_bytes())
                .then(|| self.bytes(*v))
        })
    }

    /// The first value of `name`, when it is visible ASCII (as `HeaderValue::to_str`).
    pub fn get_str(&self, name: &str) -> Option<&str> {
        as_str(self.get(name)?)
    }

    /// Whether a field is named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Whether a field `name` lists `token` (`Connection: close`).
    pub fn lists(&self, name: &str, token: &str) -> bool {
        self.get_all(name).any(|v| lists(v, token))
    }

    /// Removes every field named `name`; whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.list.len();
        let (received, added) = (&self.received, &self.added);
        self.list.retain(|(n, _)| {
            !Fields::place_of(received, added, *n).eq_ignore_ascii_case(name.as_bytes())
        });
        self.list.len() != before
    }

    fn place_of<'a>(received: &'a [u8], added: &'a [u8], p: Place) -> &'a [u8] {
        let (from, at) = match p.start & ADDED {
            0 => (received, p.start as usize),
            _ => (added, (p.start & !ADDED) as usize),
        };
        &from[at..at + p.len as usize]
    }

    /// Keeps the fields `keep` says yes to (given name and value).
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], &[u8]) -> bool) {
        let (received, added) = (&self.received, &self.added);
        self.list.retain(|(n, v)| {
            keep(
                Fields::place_of(received, added, *n),
                Fields::place_of(received, added, *v),
            )
        });
    }

    fn add(&mut self, bytes: &[u8]) -> Option<Place> {
        let start = u32::try_from(self.added.len()).ok()?;
        let len = u32::try_from(bytes.len()).ok()?;
        if start.checked_add(len)? & ADDED != 0 {
            return None;
        }
        self.added.extend_from_slice(bytes);
        Some(Place {
            start: start | ADDED,
            len,
        })
    }

    /// Adds a field after the others; `false` (and nothing added) when `name` is not a token or
    /// `value` holds a control character.
    pub fn append(&mut self, name: &str, value: &[u8]) -> bool {
        self.append_parts(name, &[value])
    }

    /// [`append`](Fields::append) with a value made of `parts`, joined (no buffer in between).
    pub fn append_parts(&mut self, name: &str, parts: &[&[u8]]) -> bool {
        if !is_name(name.as_bytes()) || !parts.iter().all(|p| is_value(p)) {
            return false;
        }
        if self.added.is_empty() {
            self.added.reserve(256);
        }
        let Some(n) = self.add(name.as_bytes()) else {
            return false;
        };
        let start = self.added.len();
        for p in parts {
            self.added.extend_from_slice(p);
        }
        let v = Place {
            start: start as u32 | ADDED,
            len: (self.added.len() - start) as u32,
        };
        // (a head's added bytes stay far below 2 GiB: the limits bound every value)
        if (self.added.len() as u64) >= u64::from(ADDED) {
            self.added.truncate(start);
            return false;
        }
        self.list.push((n, v));
        true
    }

    /// Sets `name` to `value` alone (any field of that name removed); `false` as
    /// [`append`](Fields::append) (and the old fields then kept).
    pub fn insert(&mut self, name: &str, value: &[u8]) -> bool {
        if !is_name(name.as_bytes()) || !is_value(value) {
            return false;
        }
        self.remove(name);
        self.append(name, value)
    }

    /// The fields of a map (hyper's messages).
    pub fn from_map(map: &HeaderMap) -> Fields {
        let mut fields = Fields::with_capacity(map.len() + 4);
        for (name, value) in map {
            fields.append(name.as_str(), value.as_bytes());
        }
        fields
    }

    /// The fields as a map (for hyper), each value copied.
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.list.len());
        for (name, value) in self.iter() {
            // (every field is a token and a value without control characters: checked when
            // parsed or added)
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                map.append(n, v);
            }
        }
        map
    }

    /// Removes the hop-by-hop fields (RFC 9110 §7.6.1, with the legacy `Keep-Alive` and
    /// `Proxy-Connection`) and those `Connection` names.
    pub fn strip_hop_by_hop(&mut self) {
        // (most messages carry at most `Connection`, whose usual tokens name no field)
        if !self.iter().any(|(n, _)| is_hop_by_hop(n)) {
            return;
        }
        let (received, added) = (&self.received, &self.added);
        // the `Connection` values (a few kept on the stack)
        let mut few = [Place { start: 0, len: 0 }; 4];
        let (mut n, mut more) = (0, Vec::new());
        for (name, value) in &self.list {
            if Fields::place_of(received, added, *name).eq_ignore_ascii_case(b"connection") {
                match few.get_mut(n) {
                    Some(slot) => *slot = *value,
                    None => more.push(*value),
                }
                n += 1;
            }
        }
        let connection = &few[..n.min(few.len())];
        let named = |name: &[u8]| {
            connection.iter().chain(&more).any(|v| {
                Fields::place_of(received, added, *v)
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
            })
        };
        self.list.retain(|(n, _)| {
            let n = Fields::place_of(received, added, *n);
            !is_hop_by_hop(n) && !named(n)
        });
    }
}

/// Whether a field is hop-by-hop (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and
/// `Proxy-Connection`): never forwarded.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    // (by length first: most names are none of these)
    let hop: &[u8] = match name.len() {
        2 => b"te",
        7 if name[0].eq_ignore_ascii_case(&b't') => b"trailer",
        7 => b"upgrade",
        10 if name[0].eq_ignore_ascii_case(&b'c') => b"connection",
        10 => b"keep-alive",
        16 => b"proxy-connection",
        17 => b"transfer-encoding",
        18 => b"proxy-authenticate",
        19 => b"proxy-authorization",
        _ => return false,
    };
    name.eq_ignore_ascii_case(hop)
}

/// A request as the gateway handles it: method, target, version, the header fields as they
/// came, the body, and, for a request hyper's server read, its side of a protocol switch.
pub struct Req<B> {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub fields: Fields,
    pub body: B,
    /// hyper's server's side of a switch the request asks for (`Upgrade`).
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl<B> Req<B> {
    /// A request read by hyper's server, its fields copied.
    pub fn from_request(mut r: hyper::Request<B>) -> Req<B> {
        let upgrade = r
            .headers()
            .contains_key(hyper::header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut r));
        let (parts, body) = r.into_parts();
        Req {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            fields: Fields::from_map(&parts.headers),
            body,
            upgrade,
        }
    }
}

/// The upstream's side of a protocol switch (101).
pub enum Switched {
    /// The plain HTTP/1.1 client's connection, with the bytes read past the head.
    Plain(super::h1::Upgraded),
    /// hyper's client's (HTTPS upstreams).
    Hyper(hyper::upgrade::OnUpgrade),
}

/// An answer: a status, header fields, a body, and for a 101 the upstream's side of the
/// switch.
pub struct Answer<B> {
    pub status: StatusCode,
    /// The upstream's own reason phrase, when hyper's client kept one (written as is).
    pub reason: Option<hyper::ext::ReasonPhrase>,
    pub fields: Fields,
    pub body: B,
    pub switched: Option<Switched>,
}

impl<B> Answer<B> {
    /// An answer with the fields and body given.
    pub fn new(status: StatusCode, fields: Fields, body: B) -> Answer<B> {
        Answer {
            status,
            reason: None,
            fields,
            body,
            switched: None,
        }
    }

    /// The same answer with its body made by `f`.
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> Answer<C> {
        Answer {
            status: self.status,
            reason: self.reason,
            fields: self.fields,
            body: f(self.body),
            switched: self.switched,
        }
    }

    /// The answer of hyper's client, its fields copied (and for a 101, its upgrade taken).
    pub fn from_response(mut r: hyper::Response<B>) -> Answer<B> {
        let switched = (r.status() == StatusCode::SWITCHING_PROTOCOLS)
            .then(|| Switched::Hyper(hyper::upgrade::on(&mut r)));
        let (mut parts, body) = r.into_parts();
        Answer {
            status: parts.status,
            reason: parts.extensions.remove::<hyper::ext::ReasonPhrase>(),
            fields: Fields::from_map(&parts.headers),
            body,
            switched,
        }
    }

    /// The answer for hyper's server.
    pub fn into_response(self) -> hyper::Response<B> {
        let mut r = hyper::Response::new(self.body);
        *r.status_mut() = self.status;
        *r.headers_mut() = self.fields.to_map();
        if let Some(reason) = self.reason {
            r.extensions_mut().insert(reason);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of a response head at the start of `buf` (split off it).
    fn parse(buf: &mut bytes::BytesMut) -> Fields {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut slots);
        let Ok(httparse::Status::Complete(len)) = r.parse(buf) else {
            panic!("test head does not parse");
        };
        let places = Places::of(&buf[..len], r.headers, 2).expect("places");
        Fields::parsed(buf.split_to(len).freeze(), places).expect("fields")
    }

    #[test]
    fn fields_are_found_edited_and_written_from_their_bytes() {
        let mut buf = bytes::BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nServer: up\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nSet-Cookie: a\r\nset-cookie: b\r\nKeep-Alive: timeout=5\r\n\r\nbody"[..],
        );
        let mut f = parse(&mut buf);
        assert_eq!(&buf[..], b"body", "the head is split off, the body left");
        assert_eq!(f.get("server"), Some(&b"up"[..]));
        assert_eq!(f.get_str("SERVER"), Some("up"));
        assert_eq!(f.get_all("set-cookie").count(), 2);
        assert!(f.lists("connection", "keep-alive"));
        assert!(!f.lists("connection", "close"));
        f.strip_hop_by_hop();
        let names: Vec<&[u8]> = f.iter().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"Server"[..], b"Set-Cookie", b"set-cookie"]);
        assert!(f.insert("server", b"apim"));
        assert!(f.append("via", b"1.1 apim"));
        assert!(!f.append("bad name", b"x"), "a name must be a token");
        assert!(
            !f.append("x-split", b"a\r\nx-injected: 1"),
            "no CR or LF in a value"
        );
        assert!(!f.insert("server", b"\0"));
        assert_eq!(f.get("server"), Some(&b"apim"[..]));
        let all: Vec<(&[u8], &[u8])> = f.iter().collect();
        assert_eq!(
            all,
            [
                (&b"Set-Cookie"[..], &b"a"[..]),
                (b"set-cookie", b"b"),
                (b"server", b"apim"),
                (b"via", b"1.1 apim"),
            ]
        );
        let map = f.to_map();
        assert_eq!(map.get_all("set-cookie").iter().count(), 2);
        let back = Fields::from_map(&map);
        assert_eq!(back.len(), 4);
        assert_eq!(back.get("via"), Some(&b"1.1 apim"[..]));
        assert!(f.remove("SET-COOKIE"));
        assert!(!f.remove("set-cookie"));
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn names_are_tokens_and_hop_by_hop_names_are_known() {
        let tchar = b"!#$%&'*+-.^_`|~";
        for b in 0..=255u8 {
            let token = b.is_ascii_alphanumeric() || tchar.contains(&b);
            assert_eq!(is_name(&[b]), token, "byte {b:#x}");
        }
        assert!(!is_name(b""));
        for name in [
            "Connection",
            "TE",
            "trailer",
            "Transfer-Encoding",
            "upgrade",
            "proxy-authenticate",
            "Proxy-Authorization",
            "keep-alive",
            "proxy-connection",
        ] {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
        }
        for name in [
            "tf",
            "trailers",
            "upgradex",
            "connectiom",
            "keep_alive",
            "via",
            "",
        ] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn every_connection_field_names_hop_by_hop_fields() {
        let mut f = Fields::default();
        for i in 0..6 {
            f.append("connection", format!("x-hop-{i}, keep-alive").as_bytes());
            f.append(&format!("X-Hop-{i}"), b"1");
        }
        f.append("x-kept", b"1");
        f.strip_hop_by_hop();
        let names: Vec<&[u8]> = f.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [&b"x-kept"[..]],
            "six Connection fields, each honoured"
        );
    }

    #[test]
    fn values_pass_through_as_they_came() {
        let mut buf = bytes::BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nX-Obs: caf\xc3\xa9\r\nX-Tab: a\tb\r\n\r\n"[..],
        );
        let f = parse(&mut buf);
        assert_eq!(f.get("x-obs"), Some(&b"caf\xc3\xa9"[..]));
        assert_eq!(f.get_str("x-obs"), None, "not visible ASCII");
        assert_eq!(f.get_str("x-tab"), Some("a\tb"));
    }
}
