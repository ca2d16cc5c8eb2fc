//! Options of the `oci-queue` backend: the OCI endpoint and API key keys
//! shared by every OCI backend ([`OciConfig`]).

use serde::Deserialize;

use super::OciQueueDestination;
use crate::destination::oci::OciConfig;

/// `backend = "oci-queue"`
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct OciQueueConfig(pub OciConfig);

impl OciQueueConfig {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        self.0.validate()
    }

    /// Builds the destination for the resource `id` (the OCID).
    pub fn build(&self, id: &str) -> Result<OciQueueDestination, std::io::Error> {
        OciQueueDestination::build(&self.0, id)
    }
}
