//! Options of the `oci-notifications` backend: the OCI endpoint and API key keys
//! shared by every OCI backend ([`OciConfig`]).

use serde::Deserialize;

use super::OciNotificationsDestination;
use crate::destination::oci::OciConfig;

/// `backend = "oci-notifications"`
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct OciNotificationsConfig(pub OciConfig);

impl OciNotificationsConfig {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        self.0.validate()
    }

    /// Builds the destination for the resource `id` (the OCID).
    pub fn build(&self, id: &str) -> Result<OciNotificationsDestination, std::io::Error> {
        OciNotificationsDestination::build(&self.0, id)
    }
}
