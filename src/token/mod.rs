//! Access tokens for Entra ID and managed-identity upstreams: the lifecycle
//! of one credential's token (shared by every worker), what identity
//! endpoints answer, and the requests waiting for a token. Times are
//! milliseconds since the Unix epoch.

mod coordinator;
mod response;
mod state;
mod waiters;

pub use coordinator::{Lookup, Settlement, Tokens};

pub use response::{parse_token_response, MAX_TOKEN_RESPONSE_BYTES};
pub use state::{TokenState, Wait};
pub use waiters::{Settled, Waiter, Waiters};
