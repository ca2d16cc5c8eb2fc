//! Safe logs: control characters escaped in text logs, colour only on a
//! terminal, client input clipped, error chains kept whole, and repeated
//! identical errors rate-limited with a count of what was suppressed.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{Config, LogFormat};

/// Installs the global subscriber: text (escaped, coloured only when stderr
/// is a terminal and `NO_COLOR` is unset) or JSON, on stderr.
pub fn init(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level))
        // lapin logs a returned message with its body (the record, as a
        // byte array); the AMQP backend logs the record id and routing key
        // instead.
        .add_directive(
            "lapin::returned_messages=error"
                .parse()
                .expect("a valid directive"),
        );
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Text => builder
            .with_ansi(ansi)
            .with_writer(move || EscapingWriter {
                inner: std::io::stderr(),
                ansi,
            })
            .init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .init(),
    }
}

/// Writes each formatted log line with its control characters escaped
/// (`\n`, `\r`, `\x1b`, ...), so client input cannot forge lines or drive
/// the terminal. The line's own final newline is kept; so are the colour
/// codes the formatter adds when `ansi` is on (the formatter itself escapes
/// escape characters inside field values).
pub struct EscapingWriter<W> {
    inner: W,
    ansi: bool,
}

impl<W: Write> EscapingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, ansi: bool) -> Self {
        Self { inner, ansi }
    }
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, newline) = match buf.split_last() {
            Some((b'\n', rest)) => (rest, true),
            _ => (buf, false),
        };
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.push(b),
                0x1b if self.ansi => out.push(b),
                0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                _ => out.push(b),
            }
        }
        if newline {
            out.push(b'\n');
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Client input shown in a log line or an answer: at most `max` bytes, then
/// a marker with how much was cut.
pub struct Clip<'a> {
    text: &'a str,
    max: usize,
}

/// Longest client-supplied id shown in logs and error messages.
pub const CLIP_BYTES: usize = 128;

/// Clips `text` to [`CLIP_BYTES`] for display.
pub fn clip(text: &str) -> Clip<'_> {
    Clip {
        text,
        max: CLIP_BYTES,
    }
}

impl fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.len() <= self.max {
            return f.write_str(self.text);
        }
        let mut end = self.max;
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        write!(
            f,
            "{}...[{} more bytes]",
            &self.text[..end],
            self.text.len() - end
        )
    }
}

/// An error with every cause: `outer: inner: root`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            // thiserror's `{0}` already printed a transparent cause.
            if !self.0.to_string().ends_with(&text) {
                write!(f, ": {text}")?;
            }
            source = cause.source();
        }
        Ok(())
    }
}

/// Lets one line per key through per window; counts the rest and reports
/// the count with the next line let through.
pub struct RateLimited {
    window: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Most distinct keys remembered; past it the memory starts over.
const MAX_KEYS: usize = 1024;

impl RateLimited {
    /// At most one line per key per `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed since the last line)` when a line may be logged now,
    /// `None` when this one is suppressed (and counted).
    pub fn allow(&self, key: &str) -> Option<u64> {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, suppressed)) = seen.get_mut(key) {
            if now.duration_since(*at) < self.window {
                *suppressed += 1;
                return None;
            }
            let n = *suppressed;
            *at = now;
            *suppressed = 0;
            return Some(n);
        }
        if seen.len() >= MAX_KEYS {
            seen.clear();
        }
        seen.insert(key.to_string(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(line: &str, ansi: bool) -> String {
        let mut out = Vec::new();
        EscapingWriter::new(&mut out, ansi)
            .write_all(line.as_bytes())
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn control_characters_are_escaped_and_the_line_end_kept() {
        assert_eq!(
            escaped("id=a\nFAKE line\r\x1b[31m\0\n", false),
            "id=a\\nFAKE line\\r\\x1b[31m\\x00\n"
        );
        assert_eq!(
            escaped("\x1b[2mINFO\x1b[0m a\tb\n", true),
            "\x1b[2mINFO\x1b[0m a\tb\n"
        );
        assert_eq!(escaped("é ünïcode\n", false), "é ünïcode\n");
    }

    #[test]
    fn clip_marks_what_it_cut_on_a_char_boundary() {
        assert_eq!(clip("short").to_string(), "short");
        let long = "é".repeat(100);
        let shown = clip(&long).to_string();
        assert!(shown.starts_with(&"é".repeat(64)));
        assert!(shown.ends_with("...[72 more bytes]"), "{shown}");
    }

    #[test]
    fn repeated_keys_are_suppressed_and_counted() {
        let limiter = RateLimited::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.allow_at("a", t0), Some(0));
        assert_eq!(limiter.allow_at("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(limiter.allow_at("a", t0 + Duration::from_secs(9)), None);
        assert_eq!(limiter.allow_at("b", t0 + Duration::from_secs(9)), Some(0));
        assert_eq!(limiter.allow_at("a", t0 + Duration::from_secs(11)), Some(2));
        assert_eq!(limiter.allow_at("a", t0 + Duration::from_secs(12)), None);
    }

    #[test]
    fn chain_shows_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot open journal at /x")]
        struct Outer(#[source] io::Error);
        let e = Outer(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "permission denied",
        ));
        assert_eq!(
            Chain(&e).to_string(),
            "cannot open journal at /x: permission denied"
        );
    }
}
