//! Issuer: signs short-lived workload certificates over the Linkerd identity API.
#![forbid(unsafe_code)]
