//! The HTTP side: the listeners, their connections and TLS ([`listener`], [`connection`],
//! [`tls`]), the tower stack every caller
//! request goes through ([`stack`]), the caller API's handlers ([`api`]), and the admin
//! listener's router and status page ([`admin`], [`status`]). This room turns HTTP into calls on
//! the issuance core and back; the core itself never sees hyper.
//!
//! Caller listener (`server.listen`): `POST /v1/tokens`, `POST /v1/api-keys`,
//! `DELETE /v1/tokens`, and `/truora/...` pass-through. Admin listener (`server.admin_listen`):
//! the status page `GET /`, `GET /metrics`, `/healthz`, `/readyz` and `POST /admin/reload`; never
//! the token API, so it can be exposed to Prometheus without exposing minting. Webhook listener
//! (`webhooks.listen`, [`webhook`]): Truora's deliveries and nothing else.

pub mod access;
pub mod admin;
pub mod api;
pub mod connection;
pub mod listener;
pub mod stack;
pub mod status;
pub mod tls;
pub mod webhook;

pub use admin::{Admin, Reload};
pub use api::ApiState;
pub use listener::{BindError, Listeners};
pub use stack::caller_service;
pub use tls::SharedTls;
pub use webhook::WebhookListener;
