// The CLI's help texts: `negmine help` and `negmine help COMMAND`.
#ifndef NEGMINE_CLIENT_CLI_HELP_H_
#define NEGMINE_CLIENT_CLI_HELP_H_

#include <string>

namespace negmine::client::cli {

// The whole help: global options, every command with its defaults, the
// input formats and the exit codes.
std::string Usage();

// The help of one command, or empty when there is no such command.
std::string CommandUsage(const std::string& name);

}  // namespace negmine::client::cli

#endif  // NEGMINE_CLIENT_CLI_HELP_H_
