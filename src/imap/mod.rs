//! IMAP, sans-IO: framing, pre-auth commands, SASL, the pre-auth state machine and the backend's responses.
//! Nothing here touches a socket; everything takes bytes and returns values.

pub mod command;
pub mod credentials;
pub mod framing;
pub mod inspect;
pub mod preauth;
pub mod response;
pub mod sasl;
