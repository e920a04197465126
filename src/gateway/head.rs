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

/// A name place that stands for its field's known name as the gateway writes it (lower case).
const CANONICAL: Place = Place {
    start: u32::MAX,
    len: 0,
};

/// Where a name or a value is: a range of the received head, or of the added bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Place {
    start: u32,
    len: u32,
}

impl Place {
    /// The place of `len` received bytes at `start`; `None` past the bound of places.
    fn received(start: usize, len: usize) -> Option<Place> {
        Some(Place {
            start: u32::try_from(start).ok().filter(|s| s & ADDED == 0)?,
            len: u32::try_from(len).ok()?,
        })
    }
}

/// Defines `Known` from one list of variants and their names: the enum, `Known::ALL` and
/// `Known::name`.
macro_rules! known_names {
    ($($variant:ident => $name:literal,)*) => {
        /// The names the gateway looks for or adds, told apart by a byte: a field's name is
        /// classified once, when it is parsed or added, and lookups of these names compare
        /// that byte rather than the name's letters.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum Known {
            /// Any other name (compared letter by letter, case-insensitively).
            Other,
            $($variant,)*
        }

        impl Known {
            /// Every known name (not `Other`), in order.
            pub const ALL: &'static [Known] = &[$(Known::$variant,)*];

            /// The name, in lower case (empty for `Other`).
            pub const fn name(self) -> &'static str {
                match self {
                    Known::Other => "",
                    $(Known::$variant => $name,)*
                }
            }
        }
    };
}

known_names! {
    Host => "host",
    Connection => "connection",
    ContentLength => "content-length",
    TransferEncoding => "transfer-encoding",
    Te => "te",
    Trailer => "trailer",
    Upgrade => "upgrade",
    KeepAlive => "keep-alive",
    ProxyConnection => "proxy-connection",
    ProxyAuthenticate => "proxy-authenticate",
    ProxyAuthorization => "proxy-authorization",
    XForwardedFor => "x-forwarded-for",
    XForwardedProto => "x-forwarded-proto",
    XForwardedHost => "x-forwarded-host",
    Forwarded => "forwarded",
    XRequestId => "x-request-id",
    Via => "via",
    Date => "date",
    UserAgent => "user-agent",
    Origin => "origin",
    Authorization => "authorization",
    Expect => "expect",
    ContentType => "content-type",
    Vary => "vary",
    RetryAfter => "retry-after",
    RateLimit => "ratelimit",
    RateLimitPolicy => "ratelimit-policy",
    // (the API key policy's default header)
    XApiKey => "x-api-key",
}

impl Known {
    /// Which known name `name` is (in any case), or `Other`.
    pub fn of(name: &[u8]) -> Known {
        use Known::*;
        // (by length and first letter, either case: a name is compared with one at most)
        let Some(&first) = name.first() else {
            return Other;
        };
        let candidate = match (name.len(), first | 0x20) {
            (2, b't') => Te,
            (3, b'v') => Via,
            (4, b'h') => Host,
            (4, b'd') => Date,
            (4, b'v') => Vary,
            (6, b'o') => Origin,
            (6, b'e') => Expect,
            (7, b'u') => Upgrade,
            (7, b't') => Trailer,
            (9, b'f') => Forwarded,
            (9, b'r') => RateLimit,
            (9, b'x') => XApiKey,
            (10, b'c') => Connection,
            (10, b'u') => UserAgent,
            (10, b'k') => KeepAlive,
            (11, b'r') => RetryAfter,
            (12, b'x') => XRequestId,
            (12, b'c') => ContentType,
            (13, b'a') => Authorization,
            (14, b'c') => ContentLength,
            (15, b'x') => XForwardedFor,
            (16, b'x') => XForwardedHost,
            (16, b'p') => ProxyConnection,
            (16, b'r') => RateLimitPolicy,
            (17, b'x') => XForwardedProto,
            (17, b't') => TransferEncoding,
            (18, b'p') => ProxyAuthenticate,
            (19, b'p') => ProxyAuthorization,
            _ => return Other,
        };
        match folds_to(name, candidate.name().as_bytes()) {
            true => candidate,
            false => Other,
        }
    }

    /// Whether the field is hop-by-hop (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and
    /// `Proxy-Connection`): never forwarded.
    pub fn hop_by_hop(self) -> bool {
        matches!(
            self,
            Known::Connection
                | Known::Te
                | Known::Trailer
                | Known::TransferEncoding
                | Known::Upgrade
                | Known::KeepAlive
                | Known::ProxyConnection
                | Known::ProxyAuthenticate
                | Known::ProxyAuthorization
        )
    }
}

/// Whether `name` is `lower` (a known name: lower-case letters and `-`, as long) in any case.
/// Compared a word at a time, each letter of `lower` folded with its capital (bit 0x20 set in
/// `name`'s byte), any other byte compared as it is: exact for every byte.
fn folds_to(name: &[u8], lower: &[u8]) -> bool {
    fn word(b: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    }
    // (a lower-case letter has bit 0x40, which `-` has not: 0x20 for its places only)
    let same = |n: u64, l: u64| n | ((l & each(0x40)) >> 1) == l;
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        return name
            .iter()
            .zip(lower)
            .all(|(a, b)| a | ((b & 0x40) >> 1) == *b);
    }
    let mut at = 0;
    while at + 8 <= n {
        if !same(word(name, at), word(lower, at)) {
            return false;
        }
        at += 8;
    }
    // (the last word overlaps the one before)
    at == n || same(word(name, n - 8), word(lower, n - 8))
}

/// A name to look for or to add: a known one, or any other as text.
#[derive(Clone, Copy, Debug)]
pub struct Name<'a> {
    known: Known,
    bytes: &'a [u8],
}

impl<'a> From<Known> for Name<'a> {
    fn from(known: Known) -> Name<'a> {
        Name {
            known,
            bytes: known.name().as_bytes(),
        }
    }
}

impl<'a> From<&'a [u8]> for Name<'a> {
    fn from(bytes: &'a [u8]) -> Name<'a> {
        Name {
            known: Known::of(bytes),
            bytes,
        }
    }
}

impl<'a> From<&'a str> for Name<'a> {
    fn from(name: &'a str) -> Name<'a> {
        Name::from(name.as_bytes())
    }
}

impl<'a> From<&'a String> for Name<'a> {
    fn from(name: &'a String) -> Name<'a> {
        Name::from(name.as_bytes())
    }
}

/// A field: where its name and value are, and which known name it has.
#[derive(Clone, Copy, Debug)]
struct Field {
    name: Place,
    value: Place,
    known: Known,
}

/// Where httparse's fields are in the head they were parsed from: taken while the parse
/// borrows the read buffer, then given with the head split off it to [`Fields::parsed`].
pub struct Places {
    list: Vec<Field>,
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
            (at + s.len() <= head.len())
                .then(|| Place::received(at, s.len()))
                .flatten()
        };
        let mut list = Vec::with_capacity(fields.len() + room);
        for f in fields {
            list.push(Field {
                name: place(f.name.as_bytes())?,
                value: place(f.value)?,
                known: Known::of(f.name.as_bytes()),
            });
        }
        Some(Places { list, end })
    }

    /// The fields of `head` from `at` (the line after the start line), read in one pass without
    /// httparse when they are all in their plain form, with room for `room` fields more; and
    /// where the head ends (after its empty line). The plain form: at most `max` lines, each a
    /// token, a colon, spaces or tabs, and a value (no control character but tab) that does not
    /// end in a space or tab, ended by CRLF; then CRLF. Such a head is one httparse reads the
    /// same (the same fields, names and values, the same end: its unit test and the
    /// `http1_response` fuzz target compare them). `None` for anything else, an incomplete
    /// head included: httparse decides those.
    pub fn quick(head: &[u8], mut at: usize, max: usize, room: usize) -> Option<(Places, usize)> {
        let mut list = Vec::with_capacity(12 + room);
        let mut end = 0;
        loop {
            // (each scan runs over a slice: no bounds check per byte)
            let line = head.get(at..)?;
            if line.starts_with(b"\r\n") {
                return Some((Places { list, end }, at + 2));
            }
            if list.len() == max {
                return None;
            }
            let name_len = line.iter().position(|&b| !TOKEN[usize::from(b)])?;
            if name_len == 0 || line[name_len] != b':' {
                return None;
            }
            let after = &line[name_len + 1..];
            let spaces = after.iter().position(|&b| b != b' ' && b != b'\t')?;
            // the value runs to its first control character, which must start the CRLF
            let value = &after[spaces..];
            let value_len = first_marked(value, controls)?;
            if value_len == 0
                || matches!(value[value_len - 1], b' ' | b'\t')
                || !value[value_len..].starts_with(b"\r\n")
            {
                return None;
            }
            let value_at = at + name_len + 1 + spaces;
            list.push(Field {
                name: Place::received(at, name_len)?,
                value: Place::received(value_at, value_len)?,
                known: Known::of(&line[..name_len]),
            });
            end = value_at + value_len;
            at = end + 2;
        }
    }

    /// The known name and value of each field, in order, in the `head` they were taken from.
    pub fn values<'a>(&'a self, head: &'a [u8]) -> impl Iterator<Item = (Known, &'a [u8])> + 'a {
        self.list
            .iter()
            .map(move |f| (f.known, place_of(head, &[], f.value)))
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

/// Whether `b` may be in a token (a field name, a method).
pub fn is_token_byte(b: u8) -> bool {
    TOKEN[usize::from(b)]
}

/// Whether `name` is a field name (an RFC 9110 token).
pub fn is_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| TOKEN[usize::from(b)])
}

/// Whether `value` may be a field value: no control character but horizontal tab.
pub fn is_value(value: &[u8]) -> bool {
    none_marked(value, controls)
}

/// The bytes of `w` that no field value may hold (control characters but tab, and DEL),
/// marked by their top bit.
pub(crate) fn controls(w: u64) -> u64 {
    (below_space(w) & !equal(w, b'\t')) | equal(w, 0x7f)
}

/// Whether `mark` marks no byte of `value`: eight bytes at a time, the last few padded with
/// spaces (`mark` gives a word's bytes to refuse, each by its top bit).
pub(crate) fn none_marked(value: &[u8], mark: impl Fn(u64) -> u64) -> bool {
    let mut words = value.chunks_exact(8);
    for w in words.by_ref() {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        if mark(u64::from_le_bytes(b)) != 0 {
            return false;
        }
    }
    let rest = words.remainder();
    let mut b = [b' '; 8];
    b[..rest.len()].copy_from_slice(rest);
    mark(u64::from_le_bytes(b)) == 0
}

/// Where the first byte `mark` marks is in `bytes`, eight bytes at a time; `None` when there
/// is none (`mark` as for [`none_marked`]; the last few bytes padded with spaces).
pub(crate) fn first_marked(bytes: &[u8], mark: impl Fn(u64) -> u64) -> Option<usize> {
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for w in words.by_ref() {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let m = mark(u64::from_le_bytes(b));
        if m != 0 {
            return Some(at + (m.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let rest = words.remainder();
    let mut b = [b' '; 8];
    b[..rest.len()].copy_from_slice(rest);
    let m = mark(u64::from_le_bytes(b));
    (m != 0).then(|| at + (m.trailing_zeros() / 8) as usize)
}

const LOW: u64 = 0x7f7f_7f7f_7f7f_7f7f;
pub(crate) const HIGH: u64 = 0x8080_8080_8080_8080;

/// `b` in every byte of a word.
const fn each(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}

/// The bytes of `w` equal to `b`, marked by their top bit. Exact: no carry crosses from one
/// byte into the next.
pub(crate) fn equal(w: u64, b: u8) -> u64 {
    let x = w ^ each(b);
    !(((x & LOW) + LOW) | x) & HIGH
}

/// The bytes of `w` below 0x20 (neither the top bit set nor 0x20 reached by the low seven
/// bits), marked by their top bit. Exact, as [`equal`].
pub(crate) fn below_space(w: u64) -> u64 {
    !(((w & LOW) + each(0x60)) | w) & HIGH
}

/// A field value known to be one (no control character but tab), written without another
/// check: a `HeaderValue` (checked when it was made), a constant (checked when it is compiled),
/// or a value the gateway composed of parts it checked ([`Valid::composed`]).
#[derive(Clone, Copy, Debug)]
pub struct Valid<'a>(&'a [u8]);

impl Valid<'static> {
    /// A constant value; used in a `const` item, an invalid one fails the build.
    pub const fn constant(value: &'static [u8]) -> Valid<'static> {
        let mut i = 0;
        while i < value.len() {
            let b = value[i];
            assert!((b >= 0x20 || b == b'\t') && b != 0x7f, "not a field value");
            i += 1;
        }
        Valid(value)
    }
}

impl<'a> Valid<'a> {
    /// A value the caller made of parts it checked (a routed host, a port's digits, a request
    /// id of visible ASCII): not checked again, but in debug builds (and so in every test).
    pub(crate) fn composed(value: &'a [u8]) -> Valid<'a> {
        debug_assert!(
            is_value(value),
            "a composed value that is not a field value"
        );
        Valid(value)
    }

    pub fn as_bytes(self) -> &'a [u8] {
        self.0
    }
}

impl<'a> From<&'a HeaderValue> for Valid<'a> {
    fn from(value: &'a HeaderValue) -> Valid<'a> {
        Valid(value.as_bytes())
    }
}

/// A value as text, when it is visible ASCII, spaces and tabs (as `HeaderValue::to_str`).
pub fn as_str(value: &[u8]) -> Option<&str> {
    // a value's check, and no byte above ASCII, in one pass (visible ASCII is UTF-8: the
    // conversion finds it so at once)
    let text = none_marked(value, |w| controls(w) | (w & HIGH));
    text.then(|| std::str::from_utf8(value).ok()).flatten()
}

/// Whether a comma-separated field value lists `token` (case-insensitively).
pub fn lists(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A head's header fields, in order.
#[derive(Clone, Default)]
pub struct Fields {
    /// The head as received (shared): the parsed fields point into it.
    received: Bytes,
    /// Names and values the gateway added.
    added: Vec<u8>,
    list: Vec<Field>,
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

/// The fields of a head, as (known name, name, value): [`Fields::iter_known`]. (Its `next` is
/// inlined where the fields are written out, a head's hottest loop.)
pub struct IterKnown<'a> {
    received: &'a [u8],
    added: &'a [u8],
    list: std::slice::Iter<'a, Field>,
}

impl<'a> Iterator for IterKnown<'a> {
    type Item = (Known, &'a [u8], &'a [u8]);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        let f = self.list.next()?;
        Some((
            f.known,
            name_of(self.received, self.added, f),
            place_of(self.received, self.added, f.value),
        ))
    }
}

/// The bytes at `p`, in the received head or the added bytes.
#[inline]
fn place_of<'a>(received: &'a [u8], added: &'a [u8], p: Place) -> &'a [u8] {
    let (from, at) = match p.start & ADDED {
        0 => (received, p.start as usize),
        _ => (added, (p.start & !ADDED) as usize),
    };
    &from[at..at + p.len as usize]
}

/// A field's name as it is written.
#[inline]
fn name_of<'a>(received: &'a [u8], added: &'a [u8], f: &Field) -> &'a [u8] {
    match f.name == CANONICAL {
        true => f.known.name().as_bytes(),
        false => place_of(received, added, f.name),
    }
}

/// Whether field `f` is named `name`: a known name by its byte, another by its letters.
// (inlined into every scan of the fields: for a known name, a byte compared per field)
#[inline(always)]
fn is_named(received: &[u8], added: &[u8], f: &Field, name: Name<'_>) -> bool {
    f.known == name.known
        && (name.known != Known::Other || same_name(name_of(received, added, f), name.bytes))
}

/// Whether two names are the same, in any case (the names of `Other` fields).
#[inline(never)]
fn same_name(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
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

    /// Every field, as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.iter_known().map(|(_, n, v)| (n, v))
    }

    /// Every field, as (known name, name, value).
    pub fn iter_known(&self) -> IterKnown<'_> {
        IterKnown {
            received: &self.received,
            added: &self.added,
            list: self.list.iter(),
        }
    }

    /// Every field, as (name, value), the name as a [`Name`] (its known name kept).
    fn iter_named(&self) -> impl Iterator<Item = (Name<'_>, &[u8])> + '_ {
        self.iter_known()
            .map(|(known, bytes, v)| (Name { known, bytes }, v))
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
    pub fn get_all<'a>(&'a self, name: impl Into<Name<'a>>) -> impl Iterator<Item = &'a [u8]> + 'a {
        let name = name.into();
        let (received, added) = (&self.received[..], &self.added[..]);
        self.list
            .iter()
            .filter(move |f| is_named(received, added, f, name))
            .map(move |f| place_of(received, added, f.value))
    }

    /// The first value of `name`.
    pub fn get<'a>(&'a self, name: impl Into<Name<'a>>) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }

    /// The first value of `name`, when it is visible ASCII (as `HeaderValue::to_str`).
    pub fn get_str<'a>(&'a self, name: impl Into<Name<'a>>) -> Option<&'a str> {
        as_str(self.get(name)?)
    }

    /// Whether a field is named `name`.
    pub fn contains<'a>(&'a self, name: impl Into<Name<'a>>) -> bool {
        self.get(name).is_some()
    }

    /// Whether a field `name` lists `token` (`Connection: close`).
    pub fn lists<'a>(&'a self, name: impl Into<Name<'a>>, token: &str) -> bool {
        self.get_all(name).any(|v| lists(v, token))
    }

    /// Removes every field named `name`; whether there was one.
    pub fn remove<'n>(&mut self, name: impl Into<Name<'n>>) -> bool {
        let name = name.into();
        let (received, added) = (&self.received[..], &self.added[..]);
        let Some(first) = self
            .list
            .iter()
            .position(|f| is_named(received, added, f, name))
        else {
            return false;
        };
        let mut at = 0;
        self.list.retain(|f| {
            at += 1;
            at <= first || !is_named(received, added, f, name)
        });
        true
    }

    /// Keeps the fields `keep` says yes to (given known name, name and value).
    pub fn retain(&mut self, mut keep: impl FnMut(Known, &[u8], &[u8]) -> bool) {
        let (received, added) = (&self.received[..], &self.added[..]);
        self.list.retain(|f| {
            keep(
                f.known,
                name_of(received, added, f),
                place_of(received, added, f.value),
            )
        });
    }

    /// Adds `parts`, joined, to the added bytes: their place, or `None` (and nothing added)
    /// past the bound of places.
    fn add(&mut self, parts: &[&[u8]]) -> Option<Place> {
        let start = self.added.len();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        // (a head's added bytes stay far below 2 GiB: the limits bound every value; and no
        // place can be taken for the canonical-name mark)
        if start.checked_add(len)? >= (ADDED - 1) as usize {
            return None;
        }
        if self.added.capacity() == 0 {
            self.added.reserve(len.max(256));
        }
        for p in parts {
            self.added.extend_from_slice(p);
        }
        Some(Place {
            start: start as u32 | ADDED,
            len: len as u32,
        })
    }

    /// Whether `name` and `value` make a field: a token (a known name is one) and no control
    /// character but tab.
    fn valid(name: Name<'_>, value: &[u8]) -> bool {
        (name.known != Known::Other || is_name(name.bytes)) && is_value(value)
    }

    /// Adds a field after the others; `false` (and nothing added) when `name` is not a token or
    /// `value` holds a control character. A known name is written in lower case, any other as
    /// given.
    pub fn append<'n>(&mut self, name: impl Into<Name<'n>>, value: &[u8]) -> bool {
        self.append_parts(name, &[value])
    }

    /// [`append`](Fields::append) with a value made of `parts`, joined (no buffer in between)
    /// and checked once, where it was written.
    pub fn append_parts<'n>(&mut self, name: impl Into<Name<'n>>, parts: &[&[u8]]) -> bool {
        let name = name.into();
        (name.known != Known::Other || is_name(name.bytes)) && self.push(name, parts, true)
    }

    /// Appends a field whose name is a token, its value joined from `parts` and, when `check`,
    /// checked there; `false` (and nothing added) for a value refused or past the bound of
    /// places.
    fn push(&mut self, name: Name<'_>, parts: &[&[u8]], check: bool) -> bool {
        let mark = self.added.len();
        let value = self
            .add(parts)
            .filter(|&p| !check || is_value(place_of(&[], &self.added, p)));
        let name_place = match name.known {
            Known::Other => value.and_then(|_| self.add(&[name.bytes])),
            _ => Some(CANONICAL),
        };
        let (Some(value), Some(name_place)) = (value, name_place) else {
            self.added.truncate(mark);
            return false;
        };
        self.list.push(Field {
            name: name_place,
            value,
            known: name.known,
        });
        true
    }

    /// [`append`](Fields::append) of a known name (`Other` has none: `false`) and a value known
    /// valid: nothing to check.
    pub fn append_valid(&mut self, name: Known, value: Valid<'_>) -> bool {
        name != Known::Other && self.push(Name::from(name), &[value.0], false)
    }

    /// [`insert`](Fields::insert) of a known name (not `Other`) and a value known valid.
    pub fn insert_valid(&mut self, name: Known, value: Valid<'_>) -> bool {
        name != Known::Other && self.set_valid(Name::from(name), value.0)
    }

    /// Sets `name` to `value` alone: the first field of that name takes the value where it
    /// stands (as `HeaderMap::insert`), the others go, and with none it is appended; `false`
    /// as [`append`](Fields::append) (and the old fields then kept).
    pub fn insert<'n>(&mut self, name: impl Into<Name<'n>>, value: &[u8]) -> bool {
        let name = name.into();
        Fields::valid(name, value) && self.set_valid(name, value)
    }

    /// Sets a field already found valid ([`Fields::valid`]).
    fn set_valid(&mut self, name: Name<'_>, value: &[u8]) -> bool {
        let (received, added) = (&self.received[..], &self.added[..]);
        let Some(first) = self
            .list
            .iter()
            .position(|f| is_named(received, added, f, name))
        else {
            return self.push(name, &[value], false);
        };
        let Some(place) = self.add(&[value]) else {
            return false;
        };
        self.list[first].value = place;
        let (received, added) = (&self.received[..], &self.added[..]);
        if self.list[first + 1..]
            .iter()
            .any(|f| is_named(received, added, f, name))
        {
            let mut at = 0;
            self.list.retain(|f| {
                at += 1;
                at <= first + 1 || !is_named(received, added, f, name)
            });
        }
        true
    }

    /// Adds the fields of `from` (checked when they were added there, so not again): those
    /// `lists` says are lists are appended, the others set (as [`insert`](Fields::insert)).
    pub fn merge(&mut self, from: &Fields, lists: impl Fn(Known) -> bool) {
        for (name, value) in from.iter_named() {
            if lists(name.known) {
                self.push(name, &[value], false);
            } else {
                self.set_valid(name, value);
            }
        }
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

    /// Removes the hop-by-hop fields ([`Known::hop_by_hop`]) and those `Connection` names.
    pub fn strip_hop_by_hop(&mut self) {
        // (most messages carry at most `Connection`, whose usual tokens name no field)
        let Some(first) = self.list.iter().position(|f| f.known.hop_by_hop()) else {
            return;
        };
        let (received, added) = (&self.received[..], &self.added[..]);
        // the names `Connection` lists that are not hop-by-hop anyway (a few kept on the
        // stack)
        const NONE: Name<'static> = Name {
            known: Known::Other,
            bytes: b"",
        };
        let mut few = [NONE; 8];
        let (mut n, mut more) = (0, Vec::new());
        for f in self.list[first..]
            .iter()
            .filter(|f| f.known == Known::Connection)
        {
            for token in place_of(received, added, f.value).split(|b| *b == b',') {
                let name = Name::from(token.trim_ascii());
                if name.bytes.is_empty() || name.known.hop_by_hop() {
                    continue;
                }
                match few.get_mut(n) {
                    Some(slot) => *slot = name,
                    None => more.push(name),
                }
                n += 1;
            }
        }
        let listed = &few[..n.min(few.len())];
        // the fields kept move up over those dropped, in one pass from the first dropped
        let list = &mut self.list;
        let mut kept = first;
        for i in first..list.len() {
            let f = list[i];
            let dropped = f.known.hop_by_hop()
                || (n > 0
                    && listed
                        .iter()
                        .chain(&more)
                        .any(|name| is_named(received, added, &f, *name)));
            if !dropped {
                list[kept] = f;
                kept += 1;
            }
        }
        list.truncate(kept);
    }
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
    fn values_joined_from_parts_are_checked_once_joined() {
        let mut f = Fields::default();
        assert!(f.append("x-before", b"1"));
        assert!(f.append_parts(Known::RateLimit, &[b"\"a\"", b";r=1"]));
        // a control character: refused, and nothing of it kept
        assert!(!f.append_parts(Known::RateLimit, &[b"\"b\"", b"\r\nx: y"]));
        assert!(f.append_parts(Known::RateLimitPolicy, &[b"\"a\";", b"q=2"]));
        // no name to write
        assert!(!f.append_parts(Known::Other, &[b"1"]));
        assert!(f.append("x-after", b"2"));
        let got: Vec<(&[u8], &[u8])> = f.iter().collect();
        let want: [(&[u8], &[u8]); 4] = [
            (b"x-before", b"1"),
            (b"ratelimit", b"\"a\";r=1"),
            (b"ratelimit-policy", b"\"a\";q=2"),
            (b"x-after", b"2"),
        ];
        assert_eq!(got, want);
        assert_eq!(f.get_all(Known::RateLimit).count(), 1);
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
                (&b"Server"[..], &b"apim"[..]),
                (b"Set-Cookie", b"a"),
                (b"set-cookie", b"b"),
                (b"via", b"1.1 apim"),
            ],
            "a field set takes its value where it stands"
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
    fn values_have_no_control_character_but_tab() {
        let plain = |v: &[u8]| v.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f));
        // every byte, at every place of a word and of the padded rest
        for b in 0..=255u8 {
            for len in 1..=17 {
                for at in 0..len {
                    let mut v = vec![b'a'; len];
                    v[at] = b;
                    assert_eq!(is_value(&v), plain(&v), "byte {b:#x} at {at} of {len}");
                    // text: a value, in ASCII
                    let text = plain(&v) && v.is_ascii();
                    assert_eq!(as_str(&v).is_some(), text, "text {b:#x} at {at} of {len}");
                }
            }
        }
        // neighbours that could carry into one another
        for (a, b) in [
            (0xffu8, 0x1fu8),
            (0x1f, 0xff),
            (0x80, 0x00),
            (0x7f, 0x80),
            (0x09, 0x0a),
        ] {
            for len in 2..=16 {
                for at in 0..len - 1 {
                    let mut v = vec![b'x'; len];
                    v[at] = a;
                    v[at + 1] = b;
                    assert_eq!(is_value(&v), plain(&v), "{a:#x} {b:#x} at {at} of {len}");
                    let text = plain(&v) && v.is_ascii();
                    assert_eq!(as_str(&v).is_some(), text, "text {a:#x} {b:#x} at {at}");
                }
            }
        }
        assert!(is_value(b""));
        assert!(is_value("caf\u{e9}\tau lait, 1.1 apim".as_bytes()));
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
            assert!(Known::of(name.as_bytes()).hop_by_hop(), "{name}");
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
            assert!(!Known::of(name.as_bytes()).hop_by_hop(), "{name}");
        }
    }

    #[test]
    fn known_names_are_told_by_a_byte() {
        use Known::*;
        for &k in Known::ALL {
            assert_eq!(Known::of(k.name().as_bytes()), k, "{}", k.name());
            let upper = k.name().to_ascii_uppercase();
            assert_eq!(Known::of(upper.as_bytes()), k, "{upper}");
        }
        for other in [
            "",
            "x",
            "hosts",
            "hos",
            "x-forwarded-fox",
            "vía",
            "content_type",
            "x-request-iD_",
            "te\r",
            "v\tia",
            "Trailer1",
            "trailes",
            "xonnection",
            "connectio",
            "content\rlength",
            "x\rforwarded-for",
            "keep\ralive",
            "CONTENT_LENGTH",
            "@ost",
            "hos\x7f",
            "x-forwarded-for\r",
        ] {
            assert_eq!(Known::of(other.as_bytes()), Other, "{other:?}");
        }
        // a field found by either form of its name, and an unknown name by its letters
        let mut f = Fields::default();
        assert!(f.append("X-Forwarded-For", b"1"));
        assert!(f.append(XForwardedFor, b"2"));
        assert!(f.append("X-Partner-Key", b"k"));
        assert!(f.append("x-partner-keys", b"no"));
        assert_eq!(
            f.get_all("x-forwarded-for").collect::<Vec<_>>(),
            [b"1", b"2"]
        );
        assert_eq!(f.get(XForwardedFor), Some(&b"1"[..]));
        assert_eq!(f.get("x-partner-KEY"), Some(&b"k"[..]));
        let names: Vec<&[u8]> = f.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                &b"x-forwarded-for"[..],
                b"x-forwarded-for",
                b"X-Partner-Key",
                b"x-partner-keys"
            ],
            "a known name added is written in lower case, another as given"
        );
        // a set replaces every field of the name, in the first one's place
        assert!(f.insert("x-forwarded-FOR", b"3"));
        let all: Vec<(&[u8], &[u8])> = f.iter().collect();
        assert_eq!(
            all,
            [
                (&b"x-forwarded-for"[..], &b"3"[..]),
                (b"X-Partner-Key", b"k"),
                (b"x-partner-keys", b"no"),
            ]
        );
        assert!(f.remove("X-PARTNER-KEY"));
        assert_eq!(f.len(), 2);
        assert!(!f.append("bad name", b"x"));
        assert!(
            !f.append("content\rlength", b"0"),
            "no known name by a near miss"
        );
        assert!(
            !f.insert(Via, b"a\nb"),
            "a known name's value is checked too"
        );
        assert_eq!(f.len(), 2, "nothing added by a refused field");
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
