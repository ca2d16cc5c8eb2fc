//! OCI request signing: draft-cavage HTTP signatures with RSA-SHA256, as the
//! OCI SDKs do it (reference/oci-rest.md section 4).
//!
//! The key is read once; neither it nor the signature input is ever logged.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use md5::{Digest, Md5};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// Headers signed for a request with a body (POST/PUT/PATCH).
pub const BODY_HEADERS: &[&str] = &[
    "date",
    "(request-target)",
    "host",
    "content-length",
    "content-type",
    "x-content-sha256",
];
/// Headers signed without body headers (GET, and Streaming PutMessages as the SDKs do it).
pub const BASIC_HEADERS: &[&str] = &["date", "(request-target)", "host"];

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not a PEM private key.
    #[error("not a PEM RSA private key ({0})")]
    Pem(String),
    /// Encrypted, and no passphrase was given.
    #[error(
        "the key is encrypted: give its passphrase (key_passphrase_file, or pass_phrase in the OCI CLI profile)"
    )]
    NeedsPassphrase,
    /// Encrypted in a format fnrelay cannot decrypt.
    #[error(
        "unsupported key encryption ({0}); use the traditional OpenSSL format the OCI CLI writes (Proc-Type: 4,ENCRYPTED with AES-128/256-CBC) or an unencrypted key"
    )]
    UnsupportedEncryption(String),
    /// The passphrase does not decrypt the key.
    #[error("the passphrase does not decrypt the key")]
    WrongPassphrase,
    /// Not an RSA key aws-lc accepts.
    #[error("not a usable RSA key: {0}")]
    Rejected(String),
}

/// An API signing key and its keyId.
pub struct Signer {
    key_id: String,
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The request parts that are signed.
pub struct Request<'a> {
    /// `POST`, `GET`, ...
    pub method: &'a str,
    /// Path and query exactly as sent.
    pub path_and_query: &'a str,
    /// URL authority as in the URL.
    pub host: &'a str,
    /// IMF-fixdate.
    pub date: &'a str,
    /// Body bytes.
    pub body: &'a [u8],
    /// Content type sent.
    pub content_type: &'a str,
}

/// Headers to send: `(name, value)`, including `authorization`.
pub type SignedHeaders = Vec<(&'static str, String)>;

/// Parses an unencrypted PEM private key (PKCS#1 `RSA PRIVATE KEY` or
/// PKCS#8 `PRIVATE KEY`).
pub fn parse_key(pem: &[u8]) -> Result<RsaKeyPair, KeyError> {
    parse_key_with(pem, None)
}

/// Parses a PEM private key, decrypting it with `passphrase` when it is a
/// traditional OpenSSL encrypted key (what `oci setup keys --passphrase`
/// writes: `Proc-Type: 4,ENCRYPTED`, `DEK-Info: AES-256-CBC,<iv>`).
pub fn parse_key_with(pem: &[u8], passphrase: Option<&[u8]>) -> Result<RsaKeyPair, KeyError> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("BEGIN ENCRYPTED PRIVATE KEY") {
        return Err(KeyError::UnsupportedEncryption("encrypted PKCS#8".into()));
    }
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        let passphrase = passphrase.ok_or(KeyError::NeedsPassphrase)?;
        let der = decrypt_traditional(&text, passphrase)?;
        return RsaKeyPair::from_der(&der).map_err(|e| KeyError::Rejected(e.to_string()));
    }
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| KeyError::Pem(e.to_string()))?;
    match der {
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        _ => return Err(KeyError::Rejected("not an RSA key".into())),
    }
    .map_err(|e| KeyError::Rejected(e.to_string()))
}

/// Decrypts a traditional OpenSSL encrypted PEM body: key from
/// EVP_BytesToKey(MD5, 1 round) over passphrase and the IV's first 8
/// bytes, then AES-CBC with PKCS#7 padding.
fn decrypt_traditional(text: &str, passphrase: &[u8]) -> Result<Vec<u8>, KeyError> {
    use aws_lc_rs::cipher::{
        AES_128, AES_256, DecryptionContext, PaddedBlockDecryptingKey, UnboundCipherKey,
    };
    use aws_lc_rs::iv::FixedLength;

    let dek = text
        .lines()
        .find_map(|l| l.strip_prefix("DEK-Info:"))
        .ok_or_else(|| KeyError::Pem("encrypted key without DEK-Info".into()))?;
    let (cipher, iv_hex) = dek
        .trim()
        .split_once(',')
        .ok_or_else(|| KeyError::Pem("bad DEK-Info".into()))?;
    let (algorithm, key_len) = match cipher {
        "AES-256-CBC" => (&AES_256, 32),
        "AES-128-CBC" => (&AES_128, 16),
        other => return Err(KeyError::UnsupportedEncryption(other.to_string())),
    };
    let iv: Vec<u8> = (0..iv_hex.len() / 2)
        .map(|i| u8::from_str_radix(&iv_hex[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| KeyError::Pem("DEK-Info IV is not hex".into()))?;
    let iv: [u8; 16] = iv
        .try_into()
        .map_err(|_| KeyError::Pem("DEK-Info IV is not 16 bytes".into()))?;
    let mut key = Vec::with_capacity(32);
    let mut block: Vec<u8> = Vec::new();
    while key.len() < key_len {
        let mut md5 = Md5::new();
        md5.update(&block);
        md5.update(passphrase);
        md5.update(&iv[..8]);
        block = md5.finalize().to_vec();
        key.extend_from_slice(&block);
    }
    key.truncate(key_len);
    // The base64 body starts after the blank line that ends the headers.
    let body: String = text
        .split("\n\n")
        .nth(1)
        .or_else(|| text.split("\r\n\r\n").nth(1))
        .ok_or_else(|| KeyError::Pem("no body after the PEM headers".into()))?
        .lines()
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let mut data = STANDARD
        .decode(body.trim())
        .map_err(|e| KeyError::Pem(e.to_string()))?;
    let unbound = UnboundCipherKey::new(algorithm, &key).map_err(|_| KeyError::WrongPassphrase)?;
    let decrypting =
        PaddedBlockDecryptingKey::cbc_pkcs7(unbound).map_err(|_| KeyError::WrongPassphrase)?;
    let plain = decrypting
        .decrypt(&mut data, DecryptionContext::Iv128(FixedLength::from(iv)))
        .map_err(|_| KeyError::WrongPassphrase)?;
    Ok(plain.to_vec())
}

/// The OCI fingerprint of a key: MD5 of the DER SubjectPublicKeyInfo as
/// lowercase hex pairs joined by `:`.
pub fn fingerprint(key: &RsaKeyPair) -> String {
    let spki = key.public_key().as_der().expect("RSA public key encodes");
    Md5::digest(spki.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `x-content-sha256`: base64 of SHA-256 of the body.
pub fn content_sha256(body: &[u8]) -> String {
    STANDARD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body).as_ref())
}

/// Current time as an IMF-fixdate.
pub fn http_date_now() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

/// The signing string for `headers` (lowercase names, in order).
pub fn signing_string(headers: &[&str], value: impl Fn(&str) -> String) -> String {
    headers
        .iter()
        .map(|h| format!("{h}: {}", value(h)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The signed header names and the signing string of a request.
pub fn signing_input(req: &Request<'_>, with_body: bool) -> (&'static [&'static str], String) {
    input_with_hash(req, with_body, &content_sha256(req.body))
}

/// [`signing_input`] with the body hash already computed.
fn input_with_hash(
    req: &Request<'_>,
    with_body: bool,
    sha: &str,
) -> (&'static [&'static str], String) {
    let length = req.body.len().to_string();
    let target = format!("{} {}", req.method.to_ascii_lowercase(), req.path_and_query);
    let names = if with_body {
        BODY_HEADERS
    } else {
        BASIC_HEADERS
    };
    let value = |h: &str| match h {
        "date" => req.date.to_string(),
        "(request-target)" => target.clone(),
        "host" => req.host.to_string(),
        "content-length" => length.clone(),
        "content-type" => req.content_type.to_string(),
        "x-content-sha256" => sha.to_string(),
        _ => unreachable!("only known headers are signed"),
    };
    (names, signing_string(names, value))
}

impl Signer {
    /// A signer for `tenancy/user/fingerprint` with `key`.
    pub fn new(tenancy: &str, user: &str, fingerprint: &str, key: RsaKeyPair) -> Self {
        Self {
            key_id: format!("{tenancy}/{user}/{fingerprint}"),
            key,
            rng: SystemRandom::new(),
        }
    }

    /// The keyId.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs a request; `with_body` chooses the body header set.
    pub fn sign(&self, req: &Request<'_>, with_body: bool) -> SignedHeaders {
        let sha = content_sha256(req.body);
        let (names, input) = input_with_hash(req, with_body, &sha);
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut sig)
            .expect("RSA signing with a valid key");
        let authorization = format!(
            "Signature algorithm=\"rsa-sha256\",headers=\"{}\",keyId=\"{}\",signature=\"{}\",version=\"1\"",
            names.join(" "),
            self.key_id,
            STANDARD.encode(&sig)
        );
        let mut out: SignedHeaders = vec![("date", req.date.to_string())];
        if with_body {
            out.push(("content-type", req.content_type.to_string()));
            out.push(("x-content-sha256", sha));
        }
        out.push(("authorization", authorization));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{
        RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, RSA_PKCS1_2048_8192_SHA256,
        UnparsedPublicKey,
    };
    use rustls_pki_types::PrivatePkcs1KeyDer;

    #[derive(serde::Deserialize)]
    struct Kat {
        private_key_pem: String,
        date: String,
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        method: String,
        url: String,
        headers: std::collections::HashMap<String, String>,
        body: String,
        expected_signed_headers: String,
        expected_signature: String,
        #[serde(default)]
        expected_x_content_sha256: Option<String>,
    }

    /// The published OCI test vector (docs' signingrequests.htm test values).
    const KAT: &str = include_str!("../../../tests/data/oci-sign-kat.json");
    /// A 2048-bit test key; fingerprint computed with
    /// `openssl rsa -in oci-test-key.pem -pubout -outform DER | openssl md5 -c`.
    const TEST_KEY: &str = include_str!("../../../tests/data/oci-test-key.pem");
    const TEST_KEY_PKCS8: &str = include_str!("../../../tests/data/oci-test-key-pkcs8.pem");
    const TEST_FINGERPRINT: &str = "21:7d:08:d5:9a:72:27:09:53:3c:a8:e2:82:c1:cf:18";

    /// The PKCS#1 RSAPublicKey (SEQUENCE { n, e }) inside a PKCS#1
    /// RSAPrivateKey (SEQUENCE { version, n, e, ... }): the n and e TLVs
    /// copied under a new SEQUENCE header.
    fn public_key_of(private: &[u8]) -> Vec<u8> {
        // (header length, content length) of the TLV at the start of `d`.
        fn tlv(d: &[u8]) -> (usize, usize) {
            if d[1] < 0x80 {
                (2, d[1] as usize)
            } else {
                let k = (d[1] & 0x7f) as usize;
                (
                    2 + k,
                    d[2..2 + k].iter().fold(0, |a, b| (a << 8) | *b as usize),
                )
            }
        }
        let (h, _) = tlv(private);
        let mut rest = &private[h..];
        let (vh, vl) = tlv(rest);
        rest = &rest[vh + vl..];
        let (nh, nl) = tlv(rest);
        let (eh, el) = tlv(&rest[nh + nl..]);
        let content = &rest[..nh + nl + eh + el];
        let mut out = vec![0x30];
        match content.len() {
            len @ 0..=0x7f => out.push(len as u8),
            len @ 0x80..=0xff => out.extend([0x81, len as u8]),
            len => out.extend([0x82, (len >> 8) as u8, len as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    /// The KAT key is 1024-bit, which aws-lc refuses to sign with; so the
    /// test checks that fnrelay's signing string is exactly what OCI signed:
    /// the published signatures verify against it with the KAT public key.
    #[test]
    fn published_oci_test_vector() {
        let kat: Kat = serde_json::from_str(KAT).unwrap();
        let der = PrivatePkcs1KeyDer::from_pem_slice(kat.private_key_pem.as_bytes()).unwrap();
        let public = UnparsedPublicKey::new(
            &RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
            public_key_of(der.secret_pkcs1_der()),
        );
        for case in &kat.cases {
            let url = reqwest::Url::parse(&case.url).unwrap();
            let path_and_query = match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            };
            let req = Request {
                method: &case.method,
                path_and_query: &path_and_query,
                host: url.host_str().unwrap(),
                date: &kat.date,
                body: case.body.as_bytes(),
                content_type: case
                    .headers
                    .get("content-type")
                    .map_or("application/json", String::as_str),
            };
            let (names, input) = signing_input(&req, case.method != "GET");
            assert_eq!(
                names.join(" "),
                case.expected_signed_headers,
                "{}",
                case.name
            );
            let sig = STANDARD.decode(&case.expected_signature).unwrap();
            public.verify(input.as_bytes(), &sig).unwrap_or_else(|_| {
                panic!(
                    "{}: published signature does not match our signing string:\n{input}",
                    case.name
                )
            });
            if let Some(sha) = &case.expected_x_content_sha256 {
                assert_eq!(&content_sha256(case.body.as_bytes()), sha);
            }
        }
    }

    #[test]
    fn fingerprint_matches_openssl_for_pkcs1_and_pkcs8() {
        assert_eq!(
            fingerprint(&parse_key(TEST_KEY.as_bytes()).unwrap()),
            TEST_FINGERPRINT
        );
        assert_eq!(
            fingerprint(&parse_key(TEST_KEY_PKCS8.as_bytes()).unwrap()),
            TEST_FINGERPRINT
        );
    }

    #[test]
    fn authorization_header_verifies_with_the_public_key() {
        let key = parse_key(TEST_KEY.as_bytes()).unwrap();
        let public = key.public_key().as_ref().to_vec();
        let signer = Signer::new(
            "ocid1.tenancy.oc1..t",
            "ocid1.user.oc1..u",
            TEST_FINGERPRINT,
            key,
        );
        let req = Request {
            method: "POST",
            path_and_query: "/20210201/queues/ocid1.queue.oc1..q/messages",
            host: "cell-1.queue.messaging.us-phoenix-1.oci.oraclecloud.com",
            date: "Thu, 05 Jan 2014 21:31:40 GMT",
            body: br#"{"messages":[]}"#,
            content_type: "application/json",
        };
        let headers = signer.sign(&req, true);
        let auth = &headers
            .iter()
            .find(|(n, _)| *n == "authorization")
            .unwrap()
            .1;
        assert!(auth.starts_with(
            "Signature algorithm=\"rsa-sha256\",headers=\"date (request-target) host content-length content-type x-content-sha256\",keyId=\"ocid1.tenancy.oc1..t/ocid1.user.oc1..u/21:7d:08"
        ), "{auth}");
        assert!(auth.ends_with(",version=\"1\""));
        let sig = auth
            .split("signature=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let (_, input) = signing_input(&req, true);
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public)
            .verify(input.as_bytes(), &STANDARD.decode(sig).unwrap())
            .unwrap();
        assert!(headers.contains(&("x-content-sha256", content_sha256(req.body))));
        // Without body headers (Streaming PutMessages).
        let basic = signer.sign(&req, false);
        assert!(
            basic.iter().any(|(n, v)| *n == "authorization"
                && v.contains("headers=\"date (request-target) host\""))
        );
    }

    /// Made with `openssl rsa -aes256 -traditional -in oci-test-key.pem
    /// -passout pass:fnrelay-test`, the format the OCI CLI writes.
    const TEST_KEY_ENCRYPTED: &str = include_str!("../../../tests/data/oci-test-key-encrypted.pem");

    #[test]
    fn encrypted_key_with_its_passphrase() {
        let key = parse_key_with(TEST_KEY_ENCRYPTED.as_bytes(), Some(b"fnrelay-test")).unwrap();
        assert_eq!(fingerprint(&key), TEST_FINGERPRINT);
        assert!(matches!(
            parse_key_with(TEST_KEY_ENCRYPTED.as_bytes(), Some(b"wrong")),
            Err(KeyError::WrongPassphrase) | Err(KeyError::Rejected(_))
        ));
        assert!(matches!(
            parse_key(TEST_KEY_ENCRYPTED.as_bytes()),
            Err(KeyError::NeedsPassphrase)
        ));
    }

    #[test]
    fn empty_body_hash_and_bad_keys() {
        assert_eq!(
            content_sha256(b""),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert!(matches!(
            parse_key(b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"),
            Err(KeyError::NeedsPassphrase)
        ));
        assert!(matches!(parse_key(b"hello"), Err(KeyError::Pem(_))));
        let kat: Kat = serde_json::from_str(KAT).unwrap();
        assert!(
            matches!(
                parse_key(kat.private_key_pem.as_bytes()),
                Err(KeyError::Rejected(_))
            ),
            "1024-bit keys are refused"
        );
    }
}
