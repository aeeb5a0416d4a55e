mod actions;
mod capture;
mod engine;
mod listener;
mod migrations;
mod parser;
mod receiver;
mod support;
