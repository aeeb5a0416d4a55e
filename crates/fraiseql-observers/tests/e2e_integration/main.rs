mod actions;
mod cache;
mod email;
mod listener;
mod parser;
mod sample;
mod smtp_server;
mod support;
