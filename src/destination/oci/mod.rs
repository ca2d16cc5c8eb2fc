//! What the three OCI backends share: the resource config and API-key
//! resolution, request signing, the signed HTTP call with its error
//! mapping, and the batcher that packs concurrent records into one request.

pub mod auth;
pub mod batch;
pub mod http;
pub mod signer;

pub use auth::OciConfig;
pub use http::{OciClient, OciError};
