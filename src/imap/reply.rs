//! The proxy's own answers to a client's failed login: a response code and text after `<tag> NO`, shared by
//! the pre-auth machine (which writes them) and the failure classification (which chooses them).

/// How a failed login is answered: the response code and text after `<tag> NO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub text: &'static str,
}

impl Rejection {
    pub const AUTHENTICATION_FAILED: Rejection =
        Rejection { code: "AUTHENTICATIONFAILED", text: "Authentication failed." };
    pub const UNAVAILABLE: Rejection =
        Rejection { code: "UNAVAILABLE", text: "Service temporarily unavailable, try again later." };
}
