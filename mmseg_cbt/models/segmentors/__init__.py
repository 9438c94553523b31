from .early_exit_encoder_decoder import EarlyExitEncoderDecoder
from .options import EXIT_MODES, FEATURE_MASKS, check_stop_options

__all__ = ['EarlyExitEncoderDecoder', 'EXIT_MODES', 'FEATURE_MASKS', 'check_stop_options']
