mod actions;
mod email;
mod listener;
mod parser;
mod sample;
mod smtp_server;
mod support;
