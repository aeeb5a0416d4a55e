mod capture;
mod migrations;
mod support;
