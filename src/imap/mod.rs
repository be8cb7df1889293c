//! IMAP, sans-IO: framing, pre-auth commands, SASL, the pre-auth state machine, the proxy's rejections and the backend's responses.
//! Nothing here touches a socket; everything takes bytes and returns values.

pub mod backend_login;
pub mod command;
pub mod credentials;
pub mod framing;
pub mod inspect;
pub mod mailbox;
pub mod oauth;
pub mod preauth;
pub mod reply;
pub mod response;
pub mod sasl;
pub mod starttls;
