//! Reading the model alias out of request bodies without building a tree.

mod json;

pub use json::{find_model, ModelField};
