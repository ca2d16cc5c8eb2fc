//! The OCI resource keys (SPEC section 8) and API-key resolution: an OCI CLI
//! config file and profile, or the keys given directly (those win).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::signer::{self, Signer};

/// Keys of an `oci-queue`, `oci-streaming` or `oci-notifications` resource.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OciConfig {
    /// The service endpoint: the queue's or stream's messages endpoint, the
    /// topic's API endpoint (`https://...`).
    pub endpoint: String,
    /// OCI CLI config file (`~/.oci/config` format).
    #[serde(default)]
    pub oci_config_file: Option<PathBuf>,
    /// Profile in that file.
    #[serde(default)]
    pub oci_profile: Option<String>,
    /// Tenancy OCID (overrides the file).
    #[serde(default)]
    pub tenancy: Option<String>,
    /// User OCID (overrides the file).
    #[serde(default)]
    pub user: Option<String>,
    /// API key fingerprint (overrides the file); checked against the key.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// PEM private key of the API key (overrides the file's `key_file`).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// File holding the key's passphrase, for an encrypted key (overrides
    /// the profile's `pass_phrase`).
    #[serde(default)]
    pub key_passphrase_file: Option<PathBuf>,
    /// Accept an `http://` endpoint (test servers on loopback).
    #[serde(default)]
    pub allow_insecure_endpoint: bool,
    /// Timeout of one request.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The resolved API key parameters.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Tenancy OCID.
    pub tenancy: String,
    /// User OCID.
    pub user: String,
    /// Key fingerprint.
    pub fingerprint: String,
    /// PEM private key file.
    pub key_file: PathBuf,
    /// Passphrase of an encrypted key.
    pub passphrase: Option<String>,
}

impl std::fmt::Debug for ApiKey {
    // Never print the passphrase.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("tenancy", &self.tenancy)
            .field("user", &self.user)
            .field("fingerprint", &self.fingerprint)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Parses the OCI CLI config format: `[PROFILE]` sections of `key=value`;
/// other profiles inherit `DEFAULT`'s keys.
pub fn parse_cli_config(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut profiles: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current = String::from("DEFAULT");
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_string();
            profiles.entry(current.clone()).or_default();
        } else if let Some((k, v)) = line.split_once('=') {
            profiles
                .entry(current.clone())
                .or_default()
                .insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let default = profiles.get("DEFAULT").cloned().unwrap_or_default();
    for (name, values) in profiles.iter_mut() {
        if name != "DEFAULT" {
            for (k, v) in &default {
                values.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    profiles
}

impl OciConfig {
    /// Resolves tenancy, user, fingerprint and key file, or says what is missing.
    pub fn api_key(&self) -> Result<ApiKey, (String, String)> {
        let mut from_file: HashMap<String, String> = HashMap::new();
        if let Some(path) = &self.oci_config_file {
            let path = expand_home(&path.to_string_lossy());
            let text = std::fs::read_to_string(&path).map_err(|e| {
                (
                    "oci_config_file".to_string(),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let profile = self.oci_profile.clone().unwrap_or_else(|| "DEFAULT".into());
            let mut profiles = parse_cli_config(&text);
            from_file = profiles.remove(&profile).ok_or_else(|| {
                (
                    "oci_profile".to_string(),
                    format!("profile [{profile}] is not in {}", path.display()),
                )
            })?;
        }
        let pick = |key: &str, direct: &Option<String>| -> Result<String, (String, String)> {
            direct
                .clone()
                .or_else(|| from_file.get(key).cloned())
                .ok_or_else(|| {
                    (
                        key.to_string(),
                        "is required (set it, or oci_config_file with a profile that has it)"
                            .to_string(),
                    )
                })
        };
        let key_file = self
            .key_file
            .as_ref()
            .map(|p| expand_home(&p.to_string_lossy()))
            .or_else(|| from_file.get("key_file").map(|p| expand_home(p)))
            .ok_or_else(|| {
                (
                    "key_file".to_string(),
                    "is required (set it, or oci_config_file with a profile that has it)"
                        .to_string(),
                )
            })?;
        let passphrase = match &self.key_passphrase_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        (
                            "key_passphrase_file".to_string(),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            None => from_file.get("pass_phrase").cloned(),
        };
        Ok(ApiKey {
            passphrase,
            tenancy: pick("tenancy", &self.tenancy)?,
            user: pick("user", &self.user)?,
            fingerprint: pick("fingerprint", &self.fingerprint)?,
            key_file,
        })
    }

    /// Loads the key and builds the signer; checks the fingerprint.
    pub fn signer(&self) -> Result<Signer, (String, String)> {
        let key = self.api_key()?;
        let pem = std::fs::read(&key.key_file).map_err(|e| {
            (
                "key_file".to_string(),
                format!("cannot read {}: {e}", key.key_file.display()),
            )
        })?;
        let pair = signer::parse_key_with(&pem, key.passphrase.as_deref().map(str::as_bytes))
            .map_err(|e| {
                (
                    "key_file".to_string(),
                    format!("{}: {e}", key.key_file.display()),
                )
            })?;
        let actual = signer::fingerprint(&pair);
        if !actual.eq_ignore_ascii_case(&key.fingerprint) {
            return Err((
                "fingerprint".into(),
                format!(
                    "{} does not match the key in {} (its fingerprint is {actual}); OCI would answer 401",
                    key.fingerprint,
                    key.key_file.display()
                ),
            ));
        }
        Ok(Signer::new(&key.tenancy, &key.user, &key.fingerprint, pair))
    }

    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match url::Url::parse(&self.endpoint) {
            Err(e) => out.push(("endpoint".into(), format!("not a URL ({e})"))),
            Ok(u) if u.scheme() == "https" => {}
            Ok(u) if u.scheme() == "http" && self.allow_insecure_endpoint => {}
            Ok(u) if u.scheme() == "http" => out.push((
                "endpoint".into(),
                "http:// is accepted only with allow_insecure_endpoint = true".into(),
            )),
            Ok(u) => out.push((
                "endpoint".into(),
                format!("scheme `{}` is not https", u.scheme()),
            )),
        }
        if let Err(problem) = self.signer() {
            out.push(problem);
        }
        if self.timeout.is_zero() {
            out.push(("timeout".into(), "must be greater than 0".into()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_config_profiles_inherit_default() {
        let p = parse_cli_config(
            "# comment\n[DEFAULT]\nuser=ocid1.user.oc1..u\nfingerprint = aa:bb\nkey_file=~/.oci/key.pem\ntenancy=ocid1.tenancy.oc1..t\nregion=us-phoenix-1\n\n[OTHER]\nuser=ocid1.user.oc1..other\n",
        );
        assert_eq!(p["DEFAULT"]["fingerprint"], "aa:bb");
        assert_eq!(p["OTHER"]["user"], "ocid1.user.oc1..other");
        assert_eq!(p["OTHER"]["tenancy"], "ocid1.tenancy.oc1..t");
    }

    fn base() -> OciConfig {
        OciConfig {
            endpoint: "https://cell-1.queue.messaging.us-phoenix-1.oci.oraclecloud.com".into(),
            oci_config_file: None,
            oci_profile: None,
            tenancy: Some("t".into()),
            user: Some("u".into()),
            fingerprint: Some("f".into()),
            key_file: None,
            key_passphrase_file: None,
            allow_insecure_endpoint: false,
            timeout: default_timeout(),
        }
    }

    #[test]
    fn missing_keys_and_profiles_are_named() {
        assert_eq!(base().api_key().unwrap_err().0, "key_file");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(&file, "[DEFAULT]\nuser=u\ntenancy=t\nkey_file=/k.pem\n").unwrap();
        let mut c = base();
        c.fingerprint = None;
        c.user = None;
        c.tenancy = None;
        c.oci_config_file = Some(file.clone());
        assert_eq!(c.api_key().unwrap_err().0, "fingerprint");
        c.fingerprint = Some("ff".into());
        let k = c.api_key().unwrap();
        assert_eq!(
            (
                k.tenancy.as_str(),
                k.user.as_str(),
                k.key_file.to_str().unwrap()
            ),
            ("t", "u", "/k.pem")
        );
        c.oci_profile = Some("NOPE".into());
        assert!(c.api_key().unwrap_err().1.contains("[NOPE]"));
    }

    #[test]
    fn endpoint_scheme() {
        let mut c = base();
        c.endpoint = "http://127.0.0.1:1".into();
        assert!(
            c.validate()
                .iter()
                .any(|(k, r)| k == "endpoint" && r.contains("allow_insecure_endpoint"))
        );
    }
}
