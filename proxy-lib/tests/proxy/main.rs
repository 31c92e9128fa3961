//! Integration tests of the mTLS proxy: in-process proxies on 127.0.0.1:0 for the data path,
//! reloads and admin; the `mtls-proxy` binary as a child process for signals and zero-drop
//! reloads; openssl/curl interop.

mod admin;
mod child;
mod inbound;
mod interop;
mod limits;
mod linkerd_inbound;
mod outbound;
mod reload;
mod support;
