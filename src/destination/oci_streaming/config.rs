//! Options of the `oci-streaming` backend: the OCI endpoint and API key keys
//! shared by every OCI backend ([`OciConfig`]).

use serde::Deserialize;

use super::OciStreamingDestination;
use crate::destination::oci::OciConfig;

/// `backend = "oci-streaming"`
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct OciStreamingConfig(pub OciConfig);

impl OciStreamingConfig {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        self.0.validate()
    }

    /// Builds the destination for the resource `id` (the OCID).
    pub fn build(&self, id: &str) -> Result<OciStreamingDestination, std::io::Error> {
        OciStreamingDestination::build(&self.0, id)
    }
}
