from .early_exit_encoder_decoder import EXIT_MODES, EarlyExitEncoderDecoder

__all__ = ['EarlyExitEncoderDecoder', 'EXIT_MODES']
