//! The gateway's access log: one line per request, with the fields `gateway.access_log_fields`
//! names, in the node's log format (JSON, or text).
//!
//! Lines are formatted on the request's thread into a shared buffer, written to stderr (where
//! the rest of the log goes) when it holds 32 KiB, every 100 ms, and at shutdown: one write
//! for many lines instead of one per request. It is on when the log filter lets
//! `apim::gateway::access` at `info` through, like any other target.
//!
//! Architecture invariant: no field can carry a credential. The path is logged without its
//! query string (which may hold an API key), and no header but `User-Agent` is a field.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A field of the access-log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Timestamp,
    Method,
    Path,
    Host,
    Protocol,
    Status,
    DurationUs,
    UpstreamUs,
    Tenant,
    Api,
    Consumer,
    Client,
    RequestId,
    Refusal,
    UserAgent,
    Sni,
}

impl Field {
    pub const ALL: [(&'static str, Field); 16] = [
        ("timestamp", Field::Timestamp),
        ("method", Field::Method),
        ("path", Field::Path),
        ("host", Field::Host),
        ("protocol", Field::Protocol),
        ("status", Field::Status),
        ("duration_us", Field::DurationUs),
        ("upstream_us", Field::UpstreamUs),
        ("tenant", Field::Tenant),
        ("api", Field::Api),
        ("consumer", Field::Consumer),
        ("client", Field::Client),
        ("request_id", Field::RequestId),
        ("refusal", Field::Refusal),
        ("user_agent", Field::UserAgent),
        ("sni", Field::Sni),
    ];

    /// The fields written when the configuration names none.
    pub const DEFAULT: [&'static str; 11] = [
        "timestamp",
        "method",
        "path",
        "status",
        "duration_us",
        "upstream_us",
        "tenant",
        "api",
        "consumer",
        "client",
        "request_id",
    ];

    pub fn parse(name: &str) -> Option<Field> {
        Field::ALL.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    fn name(self) -> &'static str {
        // (`ALL` lists the fields in their order: see the test)
        Field::ALL[self as usize].0
    }
}

/// What one line says. Strings are borrowed from the request and its route.
#[derive(Default)]
pub struct Entry<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub duration_us: u64,
    pub upstream_us: Option<u64>,
    pub tenant: &'a str,
    pub api: &'a str,
    pub consumer: &'a str,
    pub client: Option<std::net::IpAddr>,
    pub request_id: &'a str,
    pub refusal: &'a str,
    pub user_agent: &'a str,
    pub sni: &'a str,
}

/// Flush when the buffer holds this much.
const FLUSH_AT: usize = 32 * 1024;
/// Flush at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

pub struct AccessLog {
    /// The fields, each with what goes before its value (`,"name":` or ` name=`).
    fields: Vec<(Field, Box<[u8]>)>,
    json: bool,
    buf: Mutex<Vec<u8>>,
}

impl AccessLog {
    /// `fields` must have been checked by the configuration (unknown names are skipped).
    pub fn new(fields: &[String], json: bool) -> AccessLog {
        AccessLog {
            fields: fields
                .iter()
                .filter_map(|f| Field::parse(f))
                .map(|f| {
                    let key = match json {
                        true => format!(",\"{}\":", f.name()),
                        false => format!(" {}=", f.name()),
                    };
                    (f, key.into_bytes().into_boxed_slice())
                })
                .collect(),
            json,
            buf: Mutex::new(Vec::with_capacity(FLUSH_AT + 4096)),
        }
    }

    /// Whether lines carry `field`.
    pub fn wants(&self, field: Field) -> bool {
        self.fields.iter().any(|(f, _)| *f == field)
    }

    /// Whether lines are written (the log filter's verdict for the target, at info).
    pub fn enabled() -> bool {
        tracing::enabled!(target: "apim::gateway::access", tracing::Level::INFO)
    }

    /// Writes the line of a request that ended at `now`.
    pub fn write(&self, e: &Entry<'_>, now: SystemTime) {
        thread_local! {
            // the line is formatted outside the shared buffer's lock, in a buffer of its own
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            self.format(e, now, &mut line);
            let mut buf = super::lock(&self.buf);
            buf.extend_from_slice(&line);
            if buf.len() >= FLUSH_AT {
                // written under the lock: batches reach the log in order
                emit(&buf);
                buf.clear();
            }
        });
    }

    /// Writes the lines buffered so far.
    pub fn flush(&self) {
        let mut buf = super::lock(&self.buf);
        if !buf.is_empty() {
            emit(&buf);
            buf.clear();
        }
    }

    fn format(&self, e: &Entry<'_>, now: SystemTime, out: &mut Vec<u8>) {
        if self.json {
            out.extend_from_slice(b"{\"timestamp\":\"");
            push_timestamp(now, out);
            out.extend_from_slice(
                b"\",\"level\":\"INFO\",\"message\":\"gateway request\",\"target\":\"apim::gateway::access\"",
            );
        } else {
            push_timestamp(now, out);
            out.extend_from_slice(b"  INFO apim::gateway::access: gateway request");
        }
        for (f, key) in &self.fields {
            let value = match f {
                Field::Timestamp => continue, // every line has it
                Field::Method => Value::Str(e.method),
                Field::Path => Value::Str(e.path),
                Field::Host => Value::Str(e.host),
                Field::Protocol => Value::Str(e.protocol),
                Field::Status => Value::Num(u64::from(e.status)),
                Field::DurationUs => Value::Num(e.duration_us),
                Field::UpstreamUs => match e.upstream_us {
                    Some(n) => Value::Num(n),
                    None => continue,
                },
                Field::Tenant => Value::Str(e.tenant),
                Field::Api => Value::Str(e.api),
                Field::Consumer => Value::Str(e.consumer),
                Field::Client => match e.client {
                    Some(std::net::IpAddr::V4(v4)) => {
                        // dotted digits, without the formatter
                        let [a, b, c, d] = v4.octets();
                        let mut ip = [0u8; 15];
                        let mut n = 0;
                        for (i, octet) in [a, b, c, d].into_iter().enumerate() {
                            if i > 0 {
                                ip[n] = b'.';
                                n += 1;
                            }
                            for digit in digits(u64::from(octet), &mut itoa::Buffer::new()).bytes()
                            {
                                ip[n] = digit;
                                n += 1;
                            }
                        }
                        Value::Inline(ip, n)
                    }
                    Some(ip) => Value::Owned(ip.to_string()),
                    None => Value::Str(""),
                },
                Field::RequestId => Value::Str(e.request_id),
                Field::Refusal => Value::Str(e.refusal),
                Field::UserAgent => Value::Str(e.user_agent),
                Field::Sni => Value::Str(e.sni),
            };
            out.extend_from_slice(key);
            match value {
                Value::Num(n) => push_u64(out, n),
                Value::Str(s) => quoted(s, self.json, out),
                Value::Owned(s) => quoted(&s, self.json, out),
                Value::Inline(b, n) => {
                    quoted(std::str::from_utf8(&b[..n]).unwrap_or(""), self.json, out)
                }
            }
        }
        if self.json {
            out.push(b'}');
        }
        out.push(b'\n');
    }
}

enum Value<'a> {
    Num(u64),
    Str(&'a str),
    Owned(String),
    /// Short text held in place (an IPv4 address).
    Inline([u8; 15], usize),
}

/// The decimal digits of `n`, written into `buf` without the formatter (request path).
pub(crate) fn digits(n: u64, buf: &mut itoa::Buffer) -> &str {
    buf.format(n)
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(digits(n, &mut itoa::Buffer::new()).as_bytes());
}

/// A string as a JSON string (escaped), or for text lines as is when it is plain and quoted
/// and escaped otherwise.
fn quoted(s: &str, json: bool, out: &mut Vec<u8>) {
    if !json
        && !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    out.push(b'"');
    // most values need no escape: copied at once (checked eight bytes at a time)
    if super::head::none_marked(s.as_bytes(), |w| {
        use super::head::{below_space, equal};
        below_space(w) | equal(w, 0x7f) | equal(w, b'"') | equal(w, b'\\')
    }) {
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// Appends `now` in RFC 3339 UTC with microseconds. The date and time of day are formatted
/// once per second.
fn push_timestamp(now: SystemTime, out: &mut Vec<u8>) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            cached.1 = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            cached.0 = secs;
        }
        out.extend_from_slice(cached.1.as_bytes());
        let micros = since.subsec_micros();
        let mut frac = *b".000000Z";
        for (i, div) in [100_000, 10_000, 1_000, 100, 10, 1].into_iter().enumerate() {
            frac[1 + i] = b'0' + ((micros / div) % 10) as u8;
        }
        out.extend_from_slice(&frac);
    })
}

fn emit(lines: &[u8]) {
    // the standard error lock is the one the rest of the log takes: lines never interleave
    let _ = std::io::stderr().lock().write_all(lines);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            method: "GET",
            path: "/a\"b\\c\n",
            status: 200,
            duration_us: 42,
            upstream_us: Some(40),
            tenant: "acme",
            api: "payments",
            consumer: "",
            client: Some("10.0.0.1".parse().unwrap()),
            request_id: "r-1",
            ..Entry::default()
        }
    }

    #[test]
    fn json_lines_escape_and_follow_the_configured_fields() {
        let fields: Vec<String> = Field::DEFAULT.iter().map(|s| s.to_string()).collect();
        let log = AccessLog::new(&fields, true);
        let mut out = Vec::new();
        log.format(
            &entry(),
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_500_000),
            &mut out,
        );
        let line = String::from_utf8(out).unwrap();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["timestamp"], "1970-01-01T00:00:01.500000Z");
        assert_eq!(v["target"], "apim::gateway::access");
        assert_eq!(v["path"], "/a\"b\\c\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_us"], 40);
        assert_eq!(v["client"], "10.0.0.1");
        assert_eq!(v["consumer"], "");
        assert!(v.get("user_agent").is_none());

        let log = AccessLog::new(&["status".into(), "user_agent".into()], true);
        let mut out = Vec::new();
        let e = Entry {
            user_agent: "curl/8",
            ..entry()
        };
        log.format(&e, SystemTime::UNIX_EPOCH, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["user_agent"], "curl/8");
        assert!(v.get("path").is_none() && v.get("client").is_none());
    }

    #[test]
    fn fields_are_named_by_their_place_in_the_list() {
        for (i, (name, field)) in Field::ALL.into_iter().enumerate() {
            assert_eq!(field as usize, i, "{name}");
            assert_eq!(field.name(), name);
            assert_eq!(Field::parse(name), Some(field));
        }
    }

    #[test]
    fn text_lines_quote_what_is_not_plain() {
        let log = AccessLog::new(&["method".into(), "path".into(), "consumer".into()], false);
        let mut out = Vec::new();
        log.format(&entry(), SystemTime::UNIX_EPOCH, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000000Z  INFO apim::gateway::access: gateway request method=GET path=\"/a\\\"b\\\\c\\n\" consumer=\"\"\n"
        );
    }

    #[test]
    fn json_strings_are_escaped_at_every_place_of_a_word() {
        // each escaped character, at each place of the eight-byte words and of the rest
        for c in [
            '"', '\\', '\n', '\r', '\t', '\u{1}', '\u{1f}', '\u{7f}', '\u{e9}', ' ', '~',
        ] {
            for len in 1..=17 {
                for at in 0..len {
                    let mut s: Vec<char> = vec!['a'; len];
                    s[at] = c;
                    let s: String = s.into_iter().collect();
                    let mut out = Vec::new();
                    quoted(&s, true, &mut out);
                    let back: String = serde_json::from_slice(&out).expect("a JSON string");
                    assert_eq!(back, s, "{c:?} at {at} of {len}");
                }
            }
        }
        let mut out = Vec::new();
        assert_eq!(
            digits(u64::MAX, &mut itoa::Buffer::new()),
            "18446744073709551615"
        );
        push_u64(&mut out, 18_446_744_073_709_551_615);
        push_u64(&mut out, 0);
        assert_eq!(out, b"184467440737095516150");
    }
}
