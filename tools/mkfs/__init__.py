"""mkfs.pnova: the command-line front end of pnova.mkfs."""
