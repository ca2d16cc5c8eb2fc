//! What the three OCI backends share: the resource config and API-key
//! resolution, request signing, the signed HTTP call with its error
//! mapping, and the packing of a lane's batch into as few requests as the
//! service allows.

pub mod auth;
pub mod batch;
pub mod http;
pub mod signer;

pub use auth::OciConfig;
pub use http::{OciClient, OciError};
