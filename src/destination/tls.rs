//! The `tls_ca_file` key that every TLS-capable backend takes: a PEM file
//! of certificate authorities to trust for the destination (a private CA),
//! checked at validation and read at build.

use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Reads a PEM file of CA certificates; an error says what is wrong (the
/// file cannot be read, or holds no certificate).
pub fn read_ca(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut certificates = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
        certificates += 1;
    }
    if certificates == 0 {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(pem)
}

/// Pushes `("tls_ca_file", reason)` when the file is set and unusable.
pub fn validate_ca(path: Option<&Path>, out: &mut Vec<(String, String)>) {
    if let Some(path) = path
        && let Err(reason) = read_ca(path)
    {
        out.push(("tls_ca_file".into(), reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        assert!(read_ca(&path).unwrap_err().contains("no PEM certificate"));
        assert!(read_ca(&dir.path().join("missing.pem")).is_err());
        let mut out = Vec::new();
        validate_ca(Some(&path), &mut out);
        assert_eq!(out[0].0, "tls_ca_file");
    }
}
