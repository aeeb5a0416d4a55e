mod actions;
mod capture;
mod listener;
mod migrations;
mod parser;
mod support;
