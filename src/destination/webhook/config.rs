//! Options of the `webhook` backend.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use super::{WebhookDestination, client, encode::Secret};

/// `backend = "webhook"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Endpoint; `https://`, or `http://` with `allow_insecure_endpoint`.
    pub url: String,
    /// File holding a Standard Webhooks secret (`whsec_` + base64); enables
    /// the `webhook-signature` header.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Timeout of one request, connect included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Accept an `http://` URL (test servers on loopback).
    #[serde(default)]
    pub allow_insecure_endpoint: bool,
    /// Allow loopback, private, link-local and unspecified addresses. Off by
    /// default so that a webhook cannot reach into the sidecar's network (SSRF).
    #[serde(default)]
    pub allow_private_network: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// True for addresses a webhook may not reach without `allow_private_network`.
pub(super) fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 // 100.64/10 CGNAT
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00 // unique local
                || (v6.segments()[0] & 0xffc0) == 0xfe80 // link local
        }
    }
}

impl WebhookConfig {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match Url::parse(&self.url) {
            Err(e) => out.push(("url".into(), format!("not a URL ({e})"))),
            Ok(url) => {
                match url.scheme() {
                    "https" => {}
                    "http" if self.allow_insecure_endpoint => {}
                    "http" => out.push((
                        "url".into(),
                        "http:// is accepted only with allow_insecure_endpoint = true".into(),
                    )),
                    other => out.push((
                        "url".into(),
                        format!("scheme `{other}` is not http or https"),
                    )),
                }
                let private = match url.host() {
                    Some(url::Host::Ipv4(ip)) => is_private(ip.into()),
                    Some(url::Host::Ipv6(ip)) => is_private(ip.into()),
                    Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                    None => {
                        out.push(("url".into(), "has no host".into()));
                        false
                    }
                };
                if private && !self.allow_private_network {
                    out.push((
                        "url".into(),
                        "points into a private or loopback network; set allow_private_network = true if that is intended".into(),
                    ));
                }
            }
        }
        if let Some(path) = &self.secret_file
            && let Err(e) = Secret::from_file(path)
        {
            out.push(("secret_file".into(), e));
        }
        if self.timeout.is_zero() {
            out.push(("timeout".into(), "must be greater than 0".into()));
        }
        out
    }

    /// Builds the HTTP client (no I/O beyond reading the secret).
    pub fn build(&self) -> Result<WebhookDestination, std::io::Error> {
        let secret = match &self.secret_file {
            Some(path) => Some(Secret::from_file(path).map_err(std::io::Error::other)?),
            None => None,
        };
        let url = Url::parse(&self.url).map_err(std::io::Error::other)?;
        let client = client::Client::new(url, secret, self.timeout, self.allow_private_network)
            .map_err(std::io::Error::other)?;
        Ok(WebhookDestination { client })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, insecure: bool, private: bool) -> Vec<String> {
        WebhookConfig {
            url: url.into(),
            secret_file: None,
            timeout: default_timeout(),
            allow_insecure_endpoint: insecure,
            allow_private_network: private,
        }
        .validate()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
    }

    #[test]
    fn scheme_and_network_guards() {
        assert!(check("https://hooks.example.com/x", false, false).is_empty());
        assert!(
            check("http://hooks.example.com/x", false, false)[0]
                .contains("allow_insecure_endpoint")
        );
        assert!(check("http://hooks.example.com/x", true, false).is_empty());
        assert!(check("https://127.0.0.1:9/x", false, false)[0].contains("allow_private_network"));
        assert!(check("https://10.1.2.3/x", false, false)[0].contains("private"));
        assert!(check("https://[::1]/x", false, false)[0].contains("private"));
        assert!(check("https://localhost/x", false, false)[0].contains("private"));
        assert!(check("http://127.0.0.1:9/x", true, true).is_empty());
        assert!(check("ftp://example.com/x", false, false)[0].contains("scheme"));
        assert!(check("not a url", false, false)[0].contains("not a URL"));
    }

    #[test]
    fn private_ranges() {
        for (ip, want) in [
            ("8.8.8.8", false),
            ("169.254.169.254", true),
            ("192.168.1.1", true),
            ("100.64.0.1", true),
            ("::ffff:127.0.0.1", true),
            ("fd00::1", true),
            ("2001:db8::1", false),
        ] {
            assert_eq!(is_private(ip.parse().unwrap()), want, "{ip}");
        }
    }
}
