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
    /// Private networks this webhook may reach without opening all of them,
    /// as CIDRs (`10.20.0.0/16`, `fd00:1::/64`).
    #[serde(default)]
    pub allowed_networks: Vec<String>,
    /// PEM file of certificate authorities trusted for this endpoint, in
    /// addition to the system's (a private CA).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

/// An IP network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a CIDR (address/prefix)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{prefix}` is not a prefix length (0-{max})"))?;
        Ok(Self { addr, prefix })
    }
}

impl Network {
    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> Option<(u128, u32)> {
            match ip {
                IpAddr::V4(v4) => Some((u32::from(v4) as u128, 32)),
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => Some((u32::from(v4) as u128, 32)),
                    None => Some((u128::from(v6), 128)),
                },
            }
        };
        let (Some((net, width)), Some((addr, addr_width))) = (bits(self.addr), bits(ip)) else {
            return false;
        };
        if width != addr_width {
            return false;
        }
        let shift = width - self.prefix as u32;
        shift >= width || (net >> shift) == (addr >> shift)
    }
}

/// Which addresses a webhook may connect to.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Any private address.
    pub allow_private: bool,
    /// These private networks.
    pub allowed: Vec<Network>,
}

impl Guard {
    /// True if connecting to `ip` is refused.
    pub fn blocks(&self, ip: IpAddr) -> bool {
        is_private(ip) && !self.allow_private && !self.allowed.iter().any(|n| n.contains(ip))
    }
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
    /// The address guard from `allow_private_network` and `allowed_networks`
    /// (unparsable entries are reported by `validate`).
    pub fn guard(&self) -> Guard {
        Guard {
            allow_private: self.allow_private_network,
            allowed: self
                .allowed_networks
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
        }
    }

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
                let guard = self.guard();
                let blocked = match url.host() {
                    Some(url::Host::Ipv4(ip)) => guard.blocks(ip.into()),
                    Some(url::Host::Ipv6(ip)) => guard.blocks(ip.into()),
                    Some(url::Host::Domain(d)) => {
                        d.eq_ignore_ascii_case("localhost")
                            && guard.blocks(std::net::Ipv4Addr::LOCALHOST.into())
                    }
                    None => {
                        out.push(("url".into(), "has no host".into()));
                        false
                    }
                };
                if blocked {
                    out.push((
                        "url".into(),
                        "points into a private or loopback network; list it in allowed_networks or set allow_private_network = true if that is intended".into(),
                    ));
                }
            }
        }
        for (i, n) in self.allowed_networks.iter().enumerate() {
            if let Err(e) = n.parse::<Network>() {
                out.push((format!("allowed_networks[{i}]"), e));
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
        crate::destination::tls::validate_ca(self.tls_ca_file.as_deref(), &mut out);
        out
    }

    /// Builds the HTTP client (no I/O beyond reading the secret).
    pub fn build(&self) -> Result<WebhookDestination, std::io::Error> {
        let secret = match &self.secret_file {
            Some(path) => Some(Secret::from_file(path).map_err(std::io::Error::other)?),
            None => None,
        };
        let url = Url::parse(&self.url).map_err(std::io::Error::other)?;
        let ca = match &self.tls_ca_file {
            Some(path) => {
                Some(crate::destination::tls::read_ca(path).map_err(std::io::Error::other)?)
            }
            None => None,
        };
        let client = client::Client::new(url, secret, self.timeout, self.guard(), ca)
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
            allowed_networks: Vec::new(),
            tls_ca_file: None,
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
    fn allowed_networks_open_only_their_range() {
        let mut c = WebhookConfig {
            url: "https://10.20.3.4/hook".into(),
            secret_file: None,
            timeout: default_timeout(),
            allow_insecure_endpoint: false,
            allow_private_network: false,
            allowed_networks: vec!["10.20.0.0/16".into(), "fd00:1::/64".into()],
            tls_ca_file: None,
        };
        assert!(c.validate().is_empty());
        c.url = "https://10.21.0.1/hook".into();
        assert!(c.validate()[0].1.contains("allowed_networks"));
        let g = c.guard();
        assert!(!g.blocks("fd00:1::5".parse().unwrap()));
        assert!(g.blocks("fd00:2::5".parse().unwrap()));
        assert!(
            !g.blocks("8.8.8.8".parse().unwrap()),
            "public addresses are not affected"
        );
        c.allowed_networks = vec!["10.0.0.0".into(), "10.0.0.0/33".into()];
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["url", "allowed_networks[0]", "allowed_networks[1]"]);
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.168.1.1".parse().unwrap()));
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
